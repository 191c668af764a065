"""Real-size jobs on random-weight SD1.5 / SD2.1 / SDXL bases: one method, a few steps, measured.

The same `core.training.loop.train` a worker runs, on a base folder written by
`bench/sized_bases.py` and loaded by `core.bases.loader.load_base` with the job's own component dtypes.
Each run reports the peak tensor memory (core/training/memory_probe.py: the CUDA allocator on a GPU,
a dispatch-mode count on the CPU) of setup + step 1, of step 2 alone (optimizer state allocated),
and of the whole job (save and exports included), next to the memory planner's prediction.
The realsize tests use `run_job`; from the command line it prints the calibration table:

    python bench/realsize.py --size sd15 --resolutions 64 128                  # CPU, every method
    python bench/realsize.py --size sdxl --methods lora --resolutions 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `core` importable from the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.sized_bases import SIZED_CACHE, SIZES, ensure_sized_base
from bench.workload import CLASS_PROMPT, INITIALIZER, INSTANCE_PROMPT, PLACEHOLDER, make_items
from core.bases.architectures import KNOWN
from core.spec.job import JobSpec
from core.training.memory import estimate
from core.training.memory_probe import PeakMemory, module_bytes
from core.training.progress import NullHooks

METHODS = ("lora", "dreambooth", "textual_inversion", "hypernetwork", "controlnet", "ip_adapter")
CLASS_IMAGES = 2


def method_params(method: str) -> dict[str, Any]:
    """Each method's params as a user would send them (defaults otherwise)."""
    return {
        "lora": {"method": "lora", "rank": 16},
        "dreambooth": {
            "method": "dreambooth",
            "instance_prompt": INSTANCE_PROMPT,
            "class_prompt": CLASS_PROMPT,
            "num_class_images": CLASS_IMAGES,
        },
        "textual_inversion": {
            "method": "textual_inversion",
            "placeholder_token": PLACEHOLDER,
            "initializer_token": INITIALIZER,
            "num_vectors": 2,
        },
        "hypernetwork": {"method": "hypernetwork"},
        "controlnet": {"method": "controlnet"},
        "ip_adapter": {"method": "ip_adapter"},
    }[method]


class ProbeHooks(NullHooks):
    """Reports after steps 1 and 2 (one host sync each), reading the probe there: the peak of
    setup + step 1, then the peak of step 2 alone. Hands DreamBooth pre-made class images."""

    def __init__(self, probe: PeakMemory, class_images: list[Any]) -> None:
        super().__init__()
        self.probe = probe
        self.class_images = class_images
        self.peaks: dict[str, int] = {}
        self.marks: dict[int, float] = {}

    def steady_rate(self, total: int, batch_size: int) -> float | None:
        """Images/s over steps 3..total: without step 1's warm-up and the probe's two syncs."""
        if total <= 2 or total not in self.marks:
            return None
        return (total - 2) * batch_size / (self.marks[total] - self.marks[2])

    def should_report(self, step: int) -> bool:
        return step <= 2

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self.marks[step] = time.perf_counter()  # the loss was just read: the device is in sync
        if step <= 2:
            self.peaks["setup_and_step_1" if step == 1 else "step_2"] = self.probe.current_peak()
            self.probe.reset_peak()

    def cached_images(self, *, key: str, count: int, make: Callable[[int], list[Any]]) -> list[Any]:
        return list(self.class_images[:count])


@dataclass
class RealsizeRun:
    spec: JobSpec
    result: Any  # core.training.loop.TrainResult
    base: Any  # core.bases.loader.BaseModels, as trained (adapters installed, weights updated)
    report: dict[str, Any]


def encoder_bytes(folder: Path | None) -> int:
    """The image encoder as IP-Adapter keeps it: every parameter in fp32."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors") if folder else []:
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return 4 * total


def sized_settings(size: str, cache: Path) -> tuple[str, Any]:
    """(model id, Settings) under which `load_base` finds the random-weight `size` base."""
    from core.config import Settings

    path = ensure_sized_base(size, cache)
    model_id = f"random-{size}"
    return model_id, Settings(base_models={model_id: str(path)}, model_cache=cache)


def job_spec(
    *,
    size: str,
    method: str,
    resolution: int = 64,
    batch_size: int = 1,
    steps: int = 2,
    training: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> JobSpec:
    """The job `run_job` trains: bf16 frozen weights unless `training` says otherwise."""
    return JobSpec(
        base_model=f"random-{size}",
        dataset_id="realsize",
        params=params or method_params(method),
        training={
            "max_steps": steps,
            "batch_size": batch_size,
            "resolution": resolution,
            "mixed_precision": "bf16",
            "learning_rate": 1e-4,
            **(training or {}),
        },
    )


def run_job(
    *,
    size: str,
    method: str,
    workdir: Path,
    resolution: int = 64,
    batch_size: int = 1,
    steps: int = 2,
    training: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    device: torch.device | None = None,
    cache: Path = SIZED_CACHE,
) -> RealsizeRun:
    """Train `method` on the random `size` base for `steps` steps and report its memory."""
    from core.bases.loader import load_base
    from core.training.optim import component_dtypes, resolve_precision

    device = device or torch.device("cpu")
    model_id, settings = sized_settings(size, cache)
    spec = job_spec(
        size=size,
        method=method,
        resolution=resolution,
        batch_size=batch_size,
        steps=steps,
        training=training,
        params=params,
    )
    precision = resolve_precision(spec.training.mixed_precision, device)
    started = time.perf_counter()
    base = load_base(
        model_id, settings=settings, device=device, dtype=component_dtypes(spec.params, precision)
    )
    load_s = time.perf_counter() - started
    measured = _train_measured(
        spec=spec, base=base, method=method, resolution=resolution, workdir=workdir, device=device
    )
    predicted = estimate(spec, KNOWN[SIZES[size]], device=device.type, images=measured.images)
    job = {"size": size, "method": method, "device": device.type, "resolution": resolution}
    report = _report(job, spec, measured, predicted, batch_size=batch_size, steps=steps, load_s=load_s)
    return RealsizeRun(spec, measured.result, base, report)


@dataclass
class _Measured:
    """What one probed training run measured."""

    result: Any  # core.training.loop.TrainResult
    hooks: ProbeHooks
    images: int
    loaded_bytes: int
    untracked_bytes: int
    peak_job_bytes: int
    live_forward_end_bytes: int | None
    train_s: float


def _train_measured(
    *, spec: JobSpec, base: Any, method: str, resolution: int, workdir: Path, device: torch.device
) -> _Measured:
    """Train `spec` on `base` under the memory probe, as a worker would (save and exports included)."""
    from core.jobs.artifact import train_artifact

    items = make_items(4, resolution, seed=0, conditioning=method == "controlnet")
    class_images = [item.image for item in make_items(CLASS_IMAGES, resolution, seed=1)]
    components = [base.unet, base.vae, base.text_encoder, base.text_encoder_2]
    loaded = module_bytes(*components)
    weights = [t for m in components if m is not None for t in (*m.parameters(), *m.buffers())]
    # IP-Adapter loads its fp32 image encoder inside the job with from_pretrained, whose tensors
    # come from safetensors outside the dispatcher: counted from its file instead.
    untracked = encoder_bytes(base.image_encoder_path) if method == "ip_adapter" else 0
    forward_end: list[int] = []
    with PeakMemory(device, baseline=untracked, watch=weights) as probe:
        hooks = ProbeHooks(probe, class_images)
        # Live bytes when the UNet's forward returns: every activation saved for backward (plus
        # weights and optimizer state) is alive then, before gradients start to replace them.
        handle = base.unet.register_forward_hook(
            lambda *_: forward_end.append(probe.live) if torch.is_grad_enabled() else None
        )
        started = time.perf_counter()
        try:
            result = train_artifact(
                spec=spec, base=base, items=items, workdir=workdir, hooks=hooks, device=device
            )
        finally:
            handle.remove()
        train_s = time.perf_counter() - started
    return _Measured(
        result=result,
        hooks=hooks,
        images=len(items),
        loaded_bytes=loaded,
        untracked_bytes=untracked,
        peak_job_bytes=probe.overall,
        # The last training step's forward end (step 1 has no optimizer state yet).
        live_forward_end_bytes=forward_end[-1] if forward_end else None,
        train_s=train_s,
    )


def _report(
    job: dict[str, Any],
    spec: JobSpec,
    measured: _Measured,
    predicted: Any,
    *,
    batch_size: int,
    steps: int,
    load_s: float,
) -> dict[str, Any]:
    """One calibration row: the job (`job`: size, method, device, resolution), what it measured and
    what the planner predicted (`predicted`: core.training.memory.estimate's answer)."""
    hooks, result = measured.hooks, measured.result
    return {
        **job,
        "batch_size": batch_size,
        "gradient_checkpointing": spec.training.gradient_checkpointing,
        "optimizer": spec.training.optimizer,
        "precision": spec.training.mixed_precision,
        "weights_loaded_bytes": measured.loaded_bytes,
        "untracked_bytes": measured.untracked_bytes,
        "peak_setup_and_step_1_bytes": hooks.peaks.get("setup_and_step_1"),
        "peak_step_bytes": hooks.peaks.get("step_2"),
        "peak_job_bytes": measured.peak_job_bytes,
        "live_forward_end_bytes": measured.live_forward_end_bytes,
        "predicted_peak_bytes": predicted.peak_bytes,
        "predicted_phase": predicted.phase,
        "final_loss": result.final_loss,
        "images_per_s": result.images_per_s,
        "steady_images_per_s": hooks.steady_rate(steps, batch_size),
        "steps": steps,
        "load_s": round(load_s, 1),
        "train_s": round(measured.train_s, 1),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=SIZED_CACHE)
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    reports = []
    for method in args.methods:
        for resolution in args.resolutions:
            for gc in checkpointing:
                with tempfile.TemporaryDirectory() as workdir:
                    run = run_job(
                        size=args.size,
                        method=method,
                        workdir=Path(workdir),
                        resolution=resolution,
                        batch_size=args.batch_size,
                        steps=args.steps,
                        training={"gradient_checkpointing": gc, "optimizer": args.optimizer},
                        device=torch.device(args.device),
                        cache=args.cache,
                    )
                del run.base, run.result
                line = json.dumps(run.report)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as handle:
                        handle.write(line + "\n")
                reports.append(run.report)
    return reports


if __name__ == "__main__":
    main()
