"""Training throughput: Atelier's loop against a loop written to the diffusers-example recipe.

Both sides train the same method on the same base, data, seed, batch size and precision, in one
process. The reference (bench/reference_loops.py) does what the method's diffusers example script
does: VAE-encode every batch, text-encode it where the script does, autocast on the trained module
only (as accelerate), torch's default AdamW, `loss.item()` every step; its docstring says how each
loop matches its script and where it differs. Atelier's side is the real `core.training.loop.train`
with a JobSpec for the method (latents and frozen embeddings cached once, fused AdamW, channels_last
on CUDA, no per-step host syncs). Reports images/s for each and the ratio; timing starts after
warm-up steps on both sides. DreamBooth's class images are made up front and handed to both sides,
so neither pays for generating them.

    python bench/train_throughput.py --method lora --base tiny-sd --threads 1     # CPU, tiny base
    python bench/train_throughput.py --method controlnet --size sd15 --batch-size 8
    python bench/train_throughput.py --method dreambooth --size sdxl --batch-size 2 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `core` importable from the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.reference_harness import Settings
from bench.reference_loops import LOOPS, PRIOR_LOSS_WEIGHT, reference_rate
from bench.sized_bases import SIZED_CACHE, SIZES, load_named_base, sized_base
from bench.workload import (
    CLASS_PROMPT,
    INITIALIZER,
    INSTANCE_PROMPT,
    PLACEHOLDER,
    Item,
    controlnet_channels,
    make_items,
)
from core.spec.job import JobSpec
from core.training.progress import NullHooks

METHODS = tuple(LOOPS)


class TimingHooks(NullHooks):
    """Asks for a report (one host sync) only after the warm-up step and at the end; hands
    DreamBooth the pre-made class images instead of generating them."""

    def __init__(self, warmup: int, class_images: list[Any]) -> None:
        super().__init__()
        self.warmup = warmup
        self.class_images = class_images
        self.marks: dict[int, float] = {}

    def should_report(self, step: int) -> bool:
        return step == self.warmup

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self.marks[step] = time.perf_counter()  # loss.item() has just synced the device

    def cached_images(self, *, key: str, count: int, make: Callable[[int], list[Any]]) -> list[Any]:
        if count != len(self.class_images):
            raise ValueError(f"asked for {count} class images, the bench made {len(self.class_images)}")
        return list(self.class_images)


def method_params(method: str, base: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The job's `params`: the same method settings the reference loop uses."""
    if method == "lora":
        return {"method": "lora", "rank": args.rank}
    if method == "dreambooth":
        return {
            "method": "dreambooth",
            "instance_prompt": INSTANCE_PROMPT,
            "class_prompt": CLASS_PROMPT,
            "num_class_images": args.class_images,
            "prior_loss_weight": PRIOR_LOSS_WEIGHT,
        }
    if method == "textual_inversion":
        return {
            "method": "textual_inversion",
            "placeholder_token": PLACEHOLDER,
            "initializer_token": INITIALIZER,
        }
    if method == "controlnet":
        return {"method": "controlnet", "conditioning_embedding_out_channels": controlnet_channels(base)}
    if method in ("hypernetwork", "ip_adapter"):
        return {"method": method}  # their defaults; diffusers has no example script to match
    raise ValueError(f"unknown method {method!r}")


def atelier_rate(
    base: Any,
    items: list[Item],
    class_items: list[Item],
    args: argparse.Namespace,
    device: torch.device,
    *,
    compile: str = "off",
) -> tuple[float, Any]:
    """Images/s of Atelier's loop over the timed steps, and its TrainResult. With `compile` "on"
    the warm-up steps include the compiling ones, so the rate is the steady state."""
    from core.jobs.artifact import train_artifact

    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="bench",
        params=method_params(args.method, base, args),
        training={
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 1e-4,
            "resolution": args.resolution,
            "gradient_checkpointing": args.gradient_checkpointing,
            "seed": args.seed,
            "compile": compile,
        },
    )
    hooks = TimingHooks(args.warmup, [item.image for item in class_items])
    with tempfile.TemporaryDirectory() as workdir:
        result = train_artifact(
            spec=spec, base=base, items=items, workdir=Path(workdir), hooks=hooks, device=device
        )
    elapsed = hooks.marks[args.warmup + args.steps] - hooks.marks[args.warmup]
    return args.steps * args.batch_size / elapsed, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="lora")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", default="tiny-sd", help="a configured base model id (default tiny-sd)")
    which.add_argument("--size", choices=sorted(SIZES), help="real-size architecture, random weights")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--class-images", type=int, default=16, help="DreamBooth prior images (pre-made)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--resolution", type=int, default=None, help="default: the base's native size")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--compile", choices=["off", "on"], default="off", help="training.compile (on: captured step)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        # Atelier's clock starts at the report after the last warm-up step: there must be one.
        parser.error("--warmup and --steps must be at least 1")
    if args.size and args.resolution is None:
        args.resolution = 1024 if args.size == "sdxl" else 512
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both loops, each on a fresh copy of the base; the report as a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if args.size and device.type != "cuda" and args.device != "cpu":
        sys.exit("--size builds SD1.5/SDXL-sized models: it needs CUDA (or pass --device cpu knowingly)")

    def fresh_base() -> Any:
        if args.size:
            return sized_base(args.size, SIZED_CACHE, device)
        return load_named_base(args.base)

    # A configured base's native size is only known once loaded; --size sets it up front.
    size = args.resolution or fresh_base().resolution
    items = make_items(args.images, size, args.seed, conditioning=args.method == "controlnet")
    class_items = make_items(args.class_images, size, args.seed + 1) if args.method == "dreambooth" else []
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        resolution=size,
        seed=args.seed,
        rank=args.rank,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reference = reference_rate(args.method, fresh_base(), items, class_items, settings, device)
    reference_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    atelier, result = atelier_rate(fresh_base(), items, class_items, args, device, compile=args.compile)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "method": args.method,
        "model": args.size or args.base,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
        "batch": args.batch_size,
        "resolution": size,
        "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "reference_img_s": round(reference, 3),
        "atelier_img_s": round(atelier, 3),
        "ratio": round(atelier / reference, 2),
        "compile": args.compile,
        "compile_s": round(result.compile["compile_s"], 1),
        "graphs": result.compile["graphs"],
        "graph_breaks": result.compile["graph_breaks"],
        "final_loss": result.final_loss,
        "atelier_peak_gib": round(peak, 2) if peak is not None else None,
        "reference_peak_gib": round(reference_peak, 2) if reference_peak is not None else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Load-time notices (dtype casts, resized embeddings) would bury the report lines.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    report = measure(parse_args(argv))
    reference, atelier = report["reference_img_s"], report["atelier_img_s"]
    print(f"{report['method']}: reference (diffusers-example recipe): {reference:8.2f} img/s")
    print(f"{report['method']}: atelier loop (real train_artifact()):          {atelier:8.2f} img/s")
    print(f"{report['method']}: ratio atelier/reference:              {report['ratio']:8.2f}x")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
