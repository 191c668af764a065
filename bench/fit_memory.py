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
from core.architectures import KNOWN
from core.methods.params import JobSpec
from core.training import memory

GIB = 1024**3
IMAGES = 4  # bench/realsize.py trains on four images


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


def fit(runs: list[dict[str, Any]]) -> dict[tuple[str, bool], memory.Coefficients]:
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run["gradient_checkpointing"])].append(run)
    fitted = {}
    for key, group in sorted(groups.items()):
        rows, targets = [], []
        for run in group:
            per_sample, sums, _ = measured_activations(run)
            rows.append([sums.resnet, sums.transformer, sums.text])
            targets.append(per_sample)
        matrix = np.array(rows, dtype=np.float64)
        used = matrix.any(axis=0)  # no text column unless text encoders carried gradients
        solution = np.zeros(3)
        if used.any():
            found, *_ = np.linalg.lstsq(matrix[:, used], np.array(targets), rcond=None)
            solution[used] = np.clip(found, 0.0, None)
        fitted[key] = memory.Coefficients(*(round(float(v), 3) for v in solution))
    return fitted


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        spec, arch = spec_of(run), KNOWN[SIZES[run["size"]]]
        predicted = memory.estimate(spec, arch, device=run["device"], images=IMAGES)
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
    print("| size | method | px | checkpointing | measured GiB | predicted GiB | error |")
    print("|---|---|---|---|---|---|---|")
    for row in table(runs):
        print(
            f"| {row['size']} | {row['method']} | {row['resolution']} | {row['checkpointing']} | "
            f"{row['measured_gib']} | {row['predicted_gib']} | {row['error_pct']:+}% |"
        )


if __name__ == "__main__":
    main()
