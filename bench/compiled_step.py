"""Captured (compiled) training step against eager, and both against the diffusers-recipe reference.

For each base and method, `--rounds` rounds alternate three runs in one process, each on a fresh copy
of the base, with the same data, seed, batch and precision: the reference loop
(bench/reference_loops.py, where diffusers has an example script for the method), Atelier's real
`train()` with `training.compile: "off"`, and with `"on"`. Timing starts after `--warmup` steps, which
cover the compiling ones, so the rates are steady state; compile time is reported on its own.

Reported per method: median images/s of each side and its spread (min-max over rounds), the ratios
compiled/eager and compiled/reference, graphs and graph breaks of the compiled step (dynamo's
counters), seconds spent compiling (first round: cold or warm inductor cache, as found), and the
largest difference between the compiled and eager loss curves over the run's steps (same seed).

The tiny bases are host-bound on the CPU as SD-sized models are on a GPU (their arithmetic is
negligible; per-op dispatch dominates), which is why they stand in for launch overhead here.

    python bench/compiled_step.py --base tiny-sd --methods lora --threads 1
    python bench/compiled_step.py --base tiny-sd tiny-sdxl --rounds 3 --out compiled.jsonl
    python bench/compiled_step.py --size sd15 --methods lora --batch-size 4       # a GPU, real size
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `core` importable from the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.reference_harness import Settings
from bench.reference_loops import LOOPS, reference_rate
from bench.sized_bases import SIZED_CACHE, SIZES, load_named_base, sized_base
from bench.train_throughput import atelier_rate
from bench.workload import make_items

METHODS = ("lora", "dreambooth", "textual_inversion", "hypernetwork", "controlnet", "ip_adapter")


def _spread(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {"median": round(median, 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def _loss_gap(eager: list[tuple[int, float]], compiled: list[tuple[int, float]]) -> dict[str, float]:
    """Largest absolute and relative difference of two loss curves at the same steps."""
    pairs = [(a, b) for (s, a), (t, b) in zip(eager, compiled, strict=True) if s == t]
    absolute = max(abs(a - b) for a, b in pairs)
    relative = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    return {"points": len(pairs), "max_abs": absolute, "max_rel": relative}


def bench_method(model: str, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    def fresh_base() -> Any:
        return sized_base(model, SIZED_CACHE, device) if model in SIZES else load_named_base(model)

    size = args.resolution or fresh_base().resolution
    items = make_items(args.images, size, args.seed, conditioning=method == "controlnet")
    class_items = make_items(args.class_images, size, args.seed + 1) if method == "dreambooth" else []
    run_args = argparse.Namespace(**{**vars(args), "method": method, "resolution": size})
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        resolution=size,
        seed=args.seed,
        rank=args.rank,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    rates: dict[str, list[float]] = {"reference": [], "eager": [], "compiled": []}
    first: dict[str, Any] = {}
    for round_no in range(args.rounds):
        if method in LOOPS:
            rate = reference_rate(method, fresh_base(), items, class_items, settings, device)
            rates["reference"].append(rate)
        for side, mode in (("eager", "off"), ("compiled", "on")):
            rate, result = atelier_rate(fresh_base(), items, class_items, run_args, device, compile=mode)
            rates[side].append(rate)
            if round_no == 0:
                first[side] = result
        line = {side: round(values[-1], 2) for side, values in rates.items() if values}
        print(f"  {model} {method} round {round_no + 1}: img/s {line}", flush=True)
    eager, compiled = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    stats = first["compiled"].compile
    report: dict[str, Any] = {
        "model": model,
        "method": method,
        "device": _device_name(device),
        "batch": args.batch_size,
        "resolution": size,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "eager_img_s": _spread(rates["eager"]),
        "compiled_img_s": _spread(rates["compiled"]),
        "compiled_vs_eager": round(compiled / eager, 2),
        "graphs": stats["graphs"],
        "graph_breaks": stats["graph_breaks"],
        "shapes": stats["shapes"],
        "compile_s_first_round": round(stats["compile_s"], 1),
        "loss_gap": _loss_gap(first["eager"].loss_history, first["compiled"].loss_history),
    }
    if rates["reference"]:
        reference = statistics.median(rates["reference"])
        report["reference_img_s"] = _spread(rates["reference"])
        report["eager_vs_reference"] = round(eager / reference, 2)
        report["compiled_vs_reference"] = round(compiled / reference, 2)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", nargs="+", default=["tiny-sd"], help="configured base ids (default tiny-sd)")
    which.add_argument("--size", nargs="+", choices=sorted(SIZES), help="real-size bases, random weights")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (they include compiling)")
    parser.add_argument("--steps", type=int, default=45, help="timed steps per run")
    parser.add_argument("--images", type=int, default=32, help="a multiple of the batch: one batch shape")
    parser.add_argument("--class-images", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per method here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    reports = []
    for model in args.size or args.base:
        for method in args.methods:
            report = bench_method(model, method, args, device)
            reports.append(report)
            print(json.dumps(report), flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(report) + "\n")
    print(
        f"{'model':10} {'method':18} {'ref':>7} {'eager':>7} {'compiled':>8} {'c/e':>5} {'c/ref':>6} "
        f"{'graphs':>6} {'breaks':>6} {'compile s':>9} {'loss gap':>9}"
    )
    for r in reports:
        ref = r.get("reference_img_s", {}).get("median")
        print(
            f"{r['model']:10} {r['method']:18} {ref if ref is not None else '-':>7} "
            f"{r['eager_img_s']['median']:>7} {r['compiled_img_s']['median']:>8} {r['compiled_vs_eager']:>5} "
            f"{r.get('compiled_vs_reference', '-'):>6} {r['graphs']:>6} {r['graph_breaks']:>6} "
            f"{r['compile_s_first_round']:>9} {r['loss_gap']['max_abs']:>9.2e}"
        )
    return reports


if __name__ == "__main__":
    main()
