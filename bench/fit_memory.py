"""Fit the memory planner's activation constants to measured steps, and compare its predictions.

Reads the JSON lines `bench/realsize.py --out FILE` writes. For each run the activations are what
was live when the UNet's forward returned, less what the planner counts exactly (weights, trained
weights, optimizer state, autocast copies); per (method, checkpointing) a least-squares fit over
runs of different architectures and resolutions gives bytes per element of the planner's resnet,
transformer and text-encoder sums (core/training/memory.py). Then every run's training peak (setup
with VAE encoding, and the steps) is compared with the planner's estimate:

    python bench/realsize.py --size sd15 --resolutions 128 256 --gradient-checkpointing both --out runs.jsonl
    python bench/realsize.py --size sdxl --resolutions 128 --gradient-checkpointing both --out runs.jsonl \\
        --methods lora textual_inversion hypernetwork controlnet ip_adapter
    python bench/fit_memory.py runs.jsonl            # prints the constants and the table
    python bench/fit_memory.py runs.jsonl --check    # the table with the constants in memory.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.realsize import method_params
from bench.sized_bases import SIZES
from core.bases.architectures import KNOWN
from core.spec.job import JobSpec
from core.training import memory

GIB = 1024**3
IMAGES = 4  # bench/realsize.py trains on four images
# Methods whose backward keeps the same kinds of tensors share constants: one fit over all their
# runs is better determined than one per method (the adapters differ in a few small layers only).
GROUPS = {
    "lora": "adapter",
    "hypernetwork": "adapter",
    "ip_adapter": "adapter",
    "textual_inversion": "textual_inversion",  # gradients reach the text encoders too
    "dreambooth": "dreambooth",
    "controlnet": "controlnet",
}
SCALED = {"dreambooth", "controlnet"}


def spec_of(run: dict[str, Any]) -> JobSpec:
    return JobSpec(
        base_model=f"random-{run['size']}",
        dataset_id="realsize",
        params=method_params(run["method"]),
        training={
            "resolution": run["resolution"],
            "batch_size": run["batch_size"],
            "gradient_checkpointing": run["gradient_checkpointing"],
            "optimizer": run["optimizer"],
            "mixed_precision": run["precision"],
        },
    )


def measured_activations(run: dict[str, Any]) -> tuple[float, memory.Activations, int]:
    """(activation bytes per sample, the planner's sums, samples) for one run."""
    spec, arch = spec_of(run), KNOWN[SIZES[run["size"]]]
    parts = memory.estimate(spec, arch, device=run["device"], images=IMAGES).parts
    static = parts["weights"] + parts["trained_weights"] + parts["optimizer_state"] + parts["autocast_copies"]
    samples = run["batch_size"] * (2 if getattr(spec.params, "prior_preservation", False) else 1)
    live = run["live_forward_end_bytes"] - static
    return live / samples, memory.activation_sums(spec, arch, run["resolution"]), samples


def _solve(rows: list[list[float]], targets: list[float]) -> np.ndarray:
    matrix = np.array(rows, dtype=np.float64)
    used = matrix.any(axis=0)  # no text column unless text encoders carried gradients
    solution = np.zeros(3)
    if used.any():
        found, *_ = np.linalg.lstsq(matrix[:, used], np.array(targets), rcond=None)
        solution[used] = np.clip(found, 0.0, None)
    return solution


def fit(runs: list[dict[str, Any]]) -> dict[tuple[str, bool], memory.Coefficients]:
    """Free constants for the adapters and Textual Inversion; DreamBooth and ControlNet (measured
    on fewer, smaller runs here) as one factor on the adapters' constants, so that their share of
    resnet and transformer activations stays the physical one when extrapolated to SDXL."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(GROUPS[run["method"]], run["gradient_checkpointing"])].append(run)
    solved: dict[tuple[str, bool], np.ndarray] = {}
    for (name, checkpointing), group in sorted(groups.items(), key=lambda item: item[0][0] != "adapter"):
        rows, targets = [], []
        for run in group:
            per_sample, sums, _ = measured_activations(run)
            rows.append([sums.resnet, sums.transformer, sums.text])
            targets.append(per_sample)
        reference = solved.get(("adapter", checkpointing))
        if name in SCALED and reference is not None:
            basis = np.array(rows) @ reference
            factor = max(float(basis @ np.array(targets)) / float(basis @ basis), 0.0)
            solved[(name, checkpointing)] = reference * factor
        else:
            solved[(name, checkpointing)] = _solve(rows, targets)
    return {
        (method, checkpointing): memory.Coefficients(*(round(float(v), 3) for v in solution))
        for (name, checkpointing), solution in solved.items()
        for method, group in GROUPS.items()
        if group == name
    }


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        spec, arch = spec_of(run), KNOWN[SIZES[run["size"]]]
        predicted = memory.estimate(spec, arch, device=run["device"], images=IMAGES)
        per_sample, _, samples = measured_activations(run)
        steps = [run.get("peak_setup_and_step_1_bytes") or 0, run.get("peak_step_bytes") or 0]
        measured = max(steps)
        rows.append(
            {
                "size": run["size"],
                "method": run["method"],
                "resolution": run["resolution"],
                "checkpointing": run["gradient_checkpointing"],
                "measured_gib": round(measured / GIB, 3),
                "predicted_gib": round(predicted.peak_bytes / GIB, 3),
                "error_pct": round(100 * (predicted.peak_bytes - measured) / measured, 1),
                "activations_measured_mib": round(per_sample * samples / 2**20),
                "activations_predicted_mib": round(predicted.parts["activations"] / 2**20),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--check", action="store_true", help="use memory.py's constants, fit nothing")
    args = parser.parse_args(argv)
    runs = [json.loads(line) for path in args.runs for line in path.read_text().splitlines() if line.strip()]
    if not args.check:
        fitted = fit(runs)
        memory.ACTIVATION_COEFFICIENTS.update(fitted)
        print("ACTIVATION_COEFFICIENTS = {")
        for (method, checkpointing), k in fitted.items():
            print(f"    ({method!r}, {checkpointing}): {k!r},")
        print("}")
    print("| size | method | px | ckpt | peak GiB | predicted | error | activations MiB measured/predicted |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table(runs):
        print(
            f"| {row['size']} | {row['method']} | {row['resolution']} | {row['checkpointing']} | "
            f"{row['measured_gib']} | {row['predicted_gib']} | {row['error_pct']:+}% | "
            f"{row['activations_measured_mib']} / {row['activations_predicted_mib']} |"
        )


if __name__ == "__main__":
    main()
