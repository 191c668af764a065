"""Where a training step's time goes, eager and compiled: torch.profiler over the steady state of
Atelier's real `train_artifact()` (after the warm-up steps, which include compiling).

Prints, for each mode, the wall time per step and the ops with the most self time per step, grouped
into: matmul/conv kernels (the arithmetic), fused kernels inductor generated, other aten ops
(elementwise, reductions, copies), the optimizer, and what the profiler could not attribute to any
op (Python, dispatch and the autograd engine, i.e. host overhead). That split is what says whether
a step is still host-bound after capture.

    python bench/profile_step.py --base tiny-sd --method lora --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.sized_bases import load_named_base
from bench.train_throughput import TimingHooks, method_params
from bench.workload import make_items
from core.spec.job import JobSpec

MATMUL = ("addmm", "mm", "bmm", "baddbmm", "conv", "mkldnn", "linear", "_scaled_dot_product", "matmul")
OPTIMIZER = ("_fused_adam", "adam", "foreach", "clip_grad", "_fused")


def category(name: str) -> str:
    lowered = name.lower()
    if "cpp_fused" in lowered or "triton_" in lowered or "kernel_" in lowered:
        return "inductor fused kernels"
    if any(key in lowered for key in OPTIMIZER):
        return "optimizer + clipping"
    if any(key in lowered for key in MATMUL):
        return "matmul / conv / attention"
    return "other aten ops"


class ProfilingHooks(TimingHooks):
    """Starts the profiler after the warm-up step's report and stops it at the last step."""

    def __init__(self, warmup: int, total: int) -> None:
        super().__init__(warmup, [])
        self.total = total
        self.profiler: Any = None

    def should_report(self, step: int) -> bool:
        return step in (self.warmup, self.total)

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        super().progress(step=step, total=total, loss=loss, images_per_s=images_per_s)
        if step == self.warmup:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
        elif step == self.total and self.profiler is not None:
            self.profiler.stop()


def profile(args: argparse.Namespace, compile: str) -> dict[str, Any]:
    from core.jobs.artifact import train_artifact

    base = load_named_base(args.base)
    items = make_items(args.images, base.resolution, args.seed, conditioning=args.method == "controlnet")
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="bench",
        params=method_params(args.method, base, argparse.Namespace(rank=4, class_images=0)),
        training={
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "compile": compile,
        },
    )
    hooks = ProfilingHooks(args.warmup, args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as workdir:
        train_artifact(
            spec=spec, base=base, items=items, workdir=Path(workdir), hooks=hooks, device=torch.device("cpu")
        )
    wall = (hooks.marks[args.warmup + args.steps] - hooks.marks[args.warmup]) / args.steps
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for event in hooks.profiler.key_averages():
        self_s = event.self_cpu_time_total / 1e6 / args.steps
        if self_s <= 0:
            continue
        groups[category(event.key)] += self_s
        ops.append((self_s, event.count / args.steps, event.key))
    attributed = sum(groups.values())
    groups["unattributed (Python, dispatch, autograd engine)"] = max(wall - attributed, 0.0)
    return {"wall_s": wall, "groups": dict(groups), "top": sorted(ops, reverse=True)[: args.top]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="tiny-sd")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for compile in ("off", "on"):
        started = time.perf_counter()
        report = profile(args, compile)
        print(
            f"\n== {args.base} {args.method} batch {args.batch_size}, compile {compile}: "
            f"{report['wall_s'] * 1000:.2f} ms/step (run {time.perf_counter() - started:.0f} s)"
        )
        for name, seconds in sorted(report["groups"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:52} {seconds * 1000:8.2f} ms  {seconds / report['wall_s']:6.1%}")
        print("  top ops by self time per step:")
        for seconds, calls, key in report["top"]:
            print(f"    {seconds * 1000:8.3f} ms  {calls:6.1f} calls  {key[:90]}")


if __name__ == "__main__":
    main()
