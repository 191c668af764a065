"""Are a compiled step's gradients the eager step's? One batch, one forward and backward each way.

Compares every trainable parameter's gradient from eager against one compiled with `--backend`
(inductor, aot_eager, aot_eager_decomp_partition, or "math": eager with the math SDPA kernel, a
reference for the fused attention backward), and prints the worst relative errors. Found with it on
torch 2.13 CPU, tiny-sd LoRA batch 2: inductor's gradients are up to ~180 % off eager's while the
forward loss agrees to 1e-7; math SDPA and aot_eager_decomp_partition agree with eager to ~2e-6.
So the CPU default backend is aot_eager (core/training/step.py). Run it on a GPU to clear inductor
there before trusting a compiled CUDA run's loss curve (bench/gpu_suite.sh speed runs it).

    python bench/compiled_grads.py --base tiny-sd --backend inductor
    python bench/compiled_grads.py --size sd15 --device cuda --backend inductor
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.sized_bases import SIZED_CACHE, SIZES, load_named_base, sized_base
from bench.workload import make_items
from core.methods import get_method
from core.spec.job import JobSpec
from core.training import loop
from core.training.progress import NullHooks


class _Compared(Exception):
    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("compared")
        self.report = report


def _compare(backend: str) -> Any:
    """A stand-in for the loop's step loop: compares gradients on the run's first batch."""

    def compare(run: Any, start: int) -> Any:
        params = run.trainable.trainable_parameters()
        names = [n for n, p in run.trainable.named_parameters() if p.requires_grad]
        batch = run.data.micro_batch(0)

        def forward(b: Any) -> torch.Tensor:
            with run.autocast():
                return run.trainable(b)

        def grads(fn: Any) -> tuple[float, list[torch.Tensor]]:
            loss = fn(batch)
            loss.backward()
            out = [p.grad.detach().clone() for p in params]
            run.optimizer.zero_grad(set_to_none=True)
            return loss.item(), out

        eager_loss, eager = grads(forward)
        if backend == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                other_loss, other = grads(forward)
        else:
            other_loss, other = grads(torch.compile(forward, backend=backend))
        errors = sorted(
            (((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item(), name)
            for a, b, name in zip(eager, other, names, strict=True)
        )
        raise _Compared({"eager_loss": eager_loss, "other_loss": other_loss, "worst": errors[-8:]})

    return compare


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", default="tiny-sd")
    which.add_argument("--size", choices=sorted(SIZES))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    base = sized_base(args.size, SIZED_CACHE, device) if args.size else load_named_base(args.base)
    size = args.resolution or base.resolution
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="bench",
        params={"method": args.method},
        training={"max_steps": 1, "batch_size": args.batch_size, "resolution": size, "seed": 3},
    )
    loop._loop = _compare(args.backend)  # this process only runs this comparison
    try:
        with tempfile.TemporaryDirectory() as workdir:
            loop.train(
                method=get_method(args.method),
                spec=spec,
                base=base,
                items=make_items(8, size, 0),
                workdir=Path(workdir),
                hooks=NullHooks(),
                device=device,
            )
    except _Compared as done:
        report = done.report
    else:
        raise RuntimeError("the comparison did not run")
    print(f"loss eager {report['eager_loss']:.8f}  {args.backend} {report['other_loss']:.8f}")
    for error, name in report["worst"]:
        print(f"  {error:10.3e}  {name}")
    return report


if __name__ == "__main__":
    main()
