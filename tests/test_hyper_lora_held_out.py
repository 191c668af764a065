"""hyper_lora learns to personalise: trained over 40 colour concepts (tests/hyper_lora_world.py),
its predictions for 4 colours it never saw, and never pre-trained on, (a) move generations towards
each concept, (b) are a better start for 10 LoRA steps than the usual zero init, and (c) are
specific: each concept's generations are nearer its own colour than any other concept's.

Distances are between the mean colour of 4 generations and the concept's colour (RGB, 0-441).
One training serves the three tests; `pytest -s` prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import hyper_lora_world as world
from tests import test_training_loop as shared

pytestmark = pytest.mark.slow
one_thread, tiny_cache, load_tiny = shared.one_thread, shared.tiny_cache, shared.load_tiny
K = f"{world.FINE_TUNE_STEPS}"


@pytest.fixture(scope="module")
def results(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    rows = world.run(lambda: load_tiny(tiny_cache, "tiny-sd"), 0, tmp_path_factory.mktemp("held-out"))
    print("\n" + world.table({0: rows}))
    return rows


def test_prediction_alone_moves_held_out_concepts_towards_them(results: dict[str, dict[str, float]]) -> None:
    # Measured at seed 0 (base -> predicted): magenta 216 -> 39, lime 157 -> 86, purple 214 -> 51,
    # cyan 297 -> 75; mean ratio 0.31 (0.37 at seeds 1 and 2). Lime, between the yellow and green
    # the base knows, moves least (0.38-0.55 of the way left).
    ratios = {name: row["predicted"] / row["base"] for name, row in results.items()}
    assert sum(ratios.values()) / len(ratios) <= 0.5, ratios  # at least half way, on average
    assert all(r < 0.75 for r in ratios.values()), ratios  # and every concept clearly moves


def test_prediction_is_a_better_start_than_zero(results: dict[str, dict[str, float]]) -> None:
    for name, row in results.items():
        assert row[f"predicted+{K}"] < row[f"zero+{K}"], (name, row)


def test_prediction_is_specific_to_its_concept(results: dict[str, dict[str, float]]) -> None:
    """Concept X's reference gives X, not Y: X's generations are nearer X's colour than any other
    held-out concept's colour. Holds at seed 0; at seeds 1 and 2 the closest pair, magenta and
    purple (120 apart), are confused (see the table in issue 12's closing note)."""
    for name, row in results.items():
        assert row["predicted"] < row["to_other"], (name, row)
