"""The seed's pairing (slow): an IP-Adapter and a ControlNet trained by Atelier, used in one
generation on tiny-sd, give the reference's colour where the conditioning mask says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.bases.tiny import shipped_folder
from core.bases.tiny.world import COLOURS
from core.generation.inference import Use
from tests import composition_fixtures as fixtures
from tests import test_training_loop as shared
from tests.composition_fixtures import MAGENTA, NEAR_BLACK, Worker, scene, train_artifact
from tests.test_controlnet import Item
from tests.test_ip_adapter import colour_items

one_thread, tiny_cache, solid = shared.one_thread, shared.tiny_cache, shared.solid
fresh_worker_caches, worker = fixtures.fresh_worker_caches, fixtures.worker
PAIRING_PROMPT = "a square on a black background"


def pairing_items(rng: Any) -> list[Item]:
    """Squares of the tiny world's colours on near-black at random places, each with its mask: the
    ControlNet learns where the shape goes and leaves its colour to the rest of the request."""
    colours = [COLOURS[c] for c in ("red", "green", "yellow", "white")]
    items = []
    for index in range(16):
        image, mask = scene(colours[index % 4], tuple(rng.uniform(0.25, 0.75, size=2)), NEAR_BLACK, rng)
        items.append(Item(image, "a picture", f"{index:02d}.png", mask))
    return items


def reference_iou(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> float:
    """IoU with the mask of the region in the reference's colour: of two colour clusters (2-means),
    the one whose centre is nearer `colour`."""
    pixels = image.reshape(-1, 3)
    centres = np.stack([pixels.mean(0) - pixels.std(0), pixels.mean(0) + pixels.std(0)])
    for _ in range(20):
        labels = np.linalg.norm(pixels[:, None] - centres[None], axis=2).argmin(1)
        centres = np.stack(
            [pixels[labels == k].mean(0) if (labels == k).any() else centres[k] for k in (0, 1)]
        )
    nearest = np.linalg.norm(centres - np.array(colour, dtype=np.float64), axis=1).argmin()
    region = (labels == nearest).reshape(mask.shape)
    return float((region & mask).sum() / max((region | mask).sum(), 1))


def colour_distance(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> float:
    """Distance of the mean colour inside the mask (where the shape should be) to `colour`."""
    return float(np.linalg.norm(image[mask].mean(0) - np.array(colour, dtype=np.float64)))


# The pairing test's scales: the IP-Adapter's and the ControlNet's (see the measurements there).
IP_SCALE, CN_SCALE = 1.5, 4.0


@pytest.mark.slow
def test_the_seeds_pairing_ip_adapter_colour_and_controlnet_layout_at_once(
    worker: Worker, tiny_cache: Path, tmp_path: Path
) -> None:
    base = shipped_folder("tiny-sd")
    # The recipes of tests/test_ip_adapter.py and tests/test_controlnet.py.
    ip_items = colour_items([MAGENTA, (0, 255, 255), (255, 255, 0), (0, 0, 255)], 2)
    ip = train_artifact(
        base,
        tmp_path / "ip",
        {"method": "ip_adapter"},
        ip_items,
        max_steps=400,
        learning_rate=2e-3,
        batch_size=8,
        lr_scheduler="cosine",
        seed=0,
    )
    cn = train_artifact(
        base,
        tmp_path / "cn",
        {"method": "controlnet"},
        pairing_items(np.random.default_rng(0)),
        max_steps=120,
        learning_rate=1e-3,
        batch_size=4,
        seed=0,
    )
    ip_row, cn_row = worker.upload("ip_adapter", ip), worker.upload("controlnet", cn)
    results: dict[str, list[tuple[float, float]]] = {"base": [], "ip": [], "cn": [], "both": []}
    # Corners: the ControlNet's training squares had their centres in 0.25-0.75.
    for centre in [(0.28, 0.28), (0.72, 0.3), (0.3, 0.72), (0.72, 0.7)]:
        mask_image = scene(MAGENTA, centre, NEAR_BLACK, np.random.default_rng(0))[1]
        mask = np.asarray(mask_image)[..., 0] > 127
        reference, control = Use(ip_row, IP_SCALE, solid(MAGENTA)), Use(cn_row, CN_SCALE, mask_image)
        uses = {"base": [], "ip": [reference], "cn": [control], "both": [reference, control]}
        for name, use in uses.items():
            image = worker.generate(use, prompt=PAIRING_PROMPT, steps=20, seed=0)[0] * 255
            results[name].append((colour_distance(image, mask, MAGENTA), reference_iou(image, mask, MAGENTA)))
    distance = {name: float(np.mean([r[0] for r in rows])) for name, rows in results.items()}
    iou = {name: float(np.mean([r[1] for r in rows])) for name, rows in results.items()}
    # Measured (colour distance inside the mask, IoU) on the tiny-sd an AMD EPYC builds, with 200
    # IP-Adapter steps and scales 1.0 / 2.0: base (332, 0.11), IP-Adapter alone (36, 0.18: everything
    # magenta), ControlNet alone (313, -), both (73, 0.50); over IP-Adapter training seeds 0-2 x
    # ControlNet data seeds 0-3, both stayed within (42-108, 0.37-0.52). The pinned build is not
    # byte-identical on an Intel Xeon (Sapphire Rapids), and on that base the same recipe failed:
    # IP alone (264, 0.19), both (242, 0.24). With 400 steps and scales 1.5 / 4.0 there: base
    # (296, 0.16), IP alone (134, 0.16), ControlNet alone (295, 0.67), both (64, 0.49); it passed at
    # (IP seed, data seed) (0, 0), (1, 0), (0, 2), (1, 3) and failed at (2, 1) (both's IoU 0.26).
    assert distance["both"] < 0.8 * distance["base"], results
    assert iou["both"] > iou["base"] + 0.2, results
    assert min(r[1] for r in results["both"]) > max(r[1] for r in results["base"]), results
    # Each alone does only its half: the ControlNet keeps the base's colours, the IP-Adapter
    # paints everything in the reference colour.
    assert distance["cn"] > 1.3 * distance["both"] and iou["ip"] < iou["both"] - 0.15, results
