"""hyper_lora learns to personalise: trained over 60 colour concepts (tests/hyper_lora_world.py),
its predictions for 4 colours it never saw, and never pre-trained on, (a) move generations towards
each concept, (b) are a better start for 10 LoRA steps than the usual zero init, and (c) are
specific: each concept's generations are nearer its own colour than any other concept's.

Distances are between the mean colour of 4 generations and the concept's colour (RGB, 0-441).
One training per seed serves the three tests; `pytest -s` prints the table. The suite trains at
seed 0; ATELIER_HELD_OUT_SEEDS="0 1 2 3" runs more (about 3.5 min each, one thread).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import hyper_lora_world as world
from tests import test_training_loop as shared

pytestmark = pytest.mark.slow
one_thread, tiny_cache, load_tiny = shared.one_thread, shared.tiny_cache, shared.load_tiny
K = f"{world.FINE_TUNE_STEPS}"
SEEDS = [int(seed) for seed in os.environ.get("ATELIER_HELD_OUT_SEEDS", "0").split()]


@pytest.fixture(scope="module", params=SEEDS, ids=lambda seed: f"seed{seed}")
def results(
    request: pytest.FixtureRequest, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, float]]:
    seed = request.param
    rows = world.run(
        lambda: load_tiny(tiny_cache, "tiny-sd"), seed, tmp_path_factory.mktemp(f"held-out-{seed}")
    )
    print("\n" + world.table({seed: rows}))
    return rows


def test_prediction_alone_moves_held_out_concepts_towards_them(results: dict[str, dict[str, float]]) -> None:
    # Measured on the shipped tiny-sd, trained on an AMD EPYC (AVX2) host, with the network's
    # fan_in_scaled parametrisation (core/methods/hyper_lora.py; base -> predicted), seed 0:
    # magenta 204 -> 47, lime 164 -> 53, purple 177 -> 36, cyan 279 -> 88; mean ratio 0.27 (0.25,
    # 0.50 and 0.33 at seeds 1-3). Seed 2 fails the second assert: magenta 204 -> 154, 0.76 (its
    # purple 0.68). Before that parametrisation (AVX2 host, the then pinned base): seed 0 magenta
    # 23, lime 40, purple 44, cyan 40, mean 0.19; 0.16, 0.29, 0.24 at seeds 1-3, the worst single
    # concept lime at seed 3, 0.50.
    ratios = {name: row["predicted"] / row["base"] for name, row in results.items()}
    assert sum(ratios.values()) / len(ratios) <= 0.5, ratios  # at least half way, on average
    assert all(r < 0.75 for r in ratios.values()), ratios  # and every concept clearly moves


def test_prediction_is_a_better_start_than_zero(results: dict[str, dict[str, float]]) -> None:
    # Closest measured (fan_in_scaled, AVX2 host): magenta at seed 0, 96 against 208; purple at
    # seed 2, 70 against 154. Before it: lime at seed 2, 41 against 88; lime at seed 3, 72 against 151.
    for name, row in results.items():
        assert row[f"predicted+{K}"] < row[f"zero+{K}"], (name, row)


def test_prediction_is_specific_to_its_concept(results: dict[str, dict[str, float]]) -> None:
    """Concept X's reference gives X, not Y: X's generations are nearer X's colour than any other
    held-out concept's colour. With the fan_in_scaled network (AVX2 host) it passes at seeds 0, 1
    and 3, tightest magenta at seed 3, 74 from magenta and 86 from the nearest other, and cyan at
    seed 0, 88 against 133; it fails at seed 2, magenta's generations 154 from magenta and 132 from
    purple. Before that parametrisation it passed at seeds 0-3 on the AVX2 host's then pinned base
    (tightest magenta at seed 2, 84 against 129) and on the base a Sapphire Rapids Xeon builds
    (purple at seed 0, 58 against 73). With only the last hidden state and 40 training concepts
    it failed at seed 1: magenta landed nearer purple (85 against 71)."""
    for name, row in results.items():
        assert row["predicted"] < row["to_other"], (name, row)
