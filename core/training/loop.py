"""The one training loop every method shares.

The method supplies a `Trainable` (what trains, how a batch becomes a loss, how to save); this module
owns everything else: precision and device placement, the cached data, AdamW over the trainable
parameters only, the lr schedule, gradient accumulation and clipping, checkpoints, samples, resume
and progress. All randomness after model construction is a function of (seed, step), and a
checkpoint carries the optimizer, scheduler and RNG state, so a resumed run ends bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.artifacts import write_manifest
from core.base_models import architecture_of_folder
from core.exports import ExportContext, write_exports
from core.methods import get_method
from core.methods.base import Trainable
from core.methods.params import JobSpec, TrainingParams
from core.training import checkpoint
from core.training.caching import (
    CaptionedImage,
    PairedData,
    TrainingData,
    TrainingItem,
    build_training_data,
)
from core.training.optim import Precision, autocast, make_optimizer, resolve_precision
from core.training.progress import TrainingHooks, phase_reporter

log = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class TrainResult:
    artifact_dir: Path
    files: list[str]  # the primary artifact files, then manifest.json
    steps: int
    final_loss: float
    resumed_from_step: int | None
    images_per_s: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    exports: dict[str, list[str]] = field(default_factory=dict)  # format -> files under exports/


def _prepare_models(
    base: Any, trainable: Trainable, device: torch.device, precision: Precision, training: TrainingParams
) -> None:
    """Place the base on `device`: frozen weights in the low-precision dtype, trainable ones in fp32."""
    # The VAE runs once for caching (and to decode samples): keep it exact, in fp32.
    base.vae.to(device)
    if base.vae.dtype != torch.float32:
        base.vae.to(torch.float32)
    for name in ("unet", *TEXT_ENCODERS):
        module = getattr(base, name)
        if module is None:
            continue
        # Cast where the weights are, then move: never a full-precision copy of a frozen model on
        # the device (base components usually arrive in their dtypes already; see component_dtypes).
        for param in module.parameters():
            param.data = param.data.to(torch.float32 if param.requires_grad else precision.weight_dtype)
        module.to(device)
    if device.type == "cuda":
        base.unet.to(memory_format=torch.channels_last)  # NHWC convs are faster under bf16/fp16
    if training.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if trainable.text_encoder_trains:
            for name in TEXT_ENCODERS:
                encoder = getattr(base, name)
                if encoder is not None:
                    # transformers 5 renamed it; pyproject still allows 4.x.
                    enable = getattr(encoder, "activation_checkpointing_enable", None)
                    (enable or encoder.gradient_checkpointing_enable)({"use_reentrant": False})


def _freeze(base: Any) -> None:
    for name in ("vae", "unet", *TEXT_ENCODERS):
        module = getattr(base, name)
        if module is not None:
            module.requires_grad_(False)


@dataclass
class _Run:
    """Everything one step needs, built once by `train`."""

    spec: JobSpec
    trainable: Trainable
    data: TrainingData | PairedData
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    hooks: TrainingHooks
    workdir: Path
    resolution: int

    @property
    def training(self) -> TrainingParams:
        return self.spec.training

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.precision)


def _optimizer_step(run: _Run, step: int, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, int]:
    """One optimizer step (0-based `step`) over its micro-batches: (mean loss on device, images)."""
    accumulation = run.training.gradient_accumulation_steps
    total = torch.zeros((), device=run.device)
    images = 0
    for micro in range(accumulation):
        batch = run.data.micro_batch(step * accumulation + micro)
        with run.autocast():
            loss = run.trainable(batch)
        run.scaler.scale(loss / accumulation).backward()
        total += loss.detach()
        images += len(batch)
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(params, run.training.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / accumulation, images


class _Meter:
    """Sums loss on the device; only `flush` (at report points) syncs with the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()
        self.started = time.perf_counter()
        self.images_total = 0

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.count, self.images, self.since = 0, 0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave checkpoints and samples out of the images/s figures."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # rare (checkpoint/sample points): finish queued steps first
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.since += elapsed
            self.started += elapsed

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.count += 1
        self.images += images
        self.images_total += images

    def flush(self) -> tuple[float, float]:
        """(mean loss, images/s) since the last flush."""
        loss = (self.loss / max(self.count, 1)).item()
        rate = self.images / max(time.perf_counter() - self.since, 1e-9)
        self._reset()
        return loss, rate

    def overall_rate(self) -> float:
        return self.images_total / max(time.perf_counter() - self.started, 1e-9)


def _save_checkpoint(run: _Run, step: int, previous: Path | None) -> Path:
    folder = run.workdir / "checkpoints" / f"step-{step:08d}"
    checkpoint.save_checkpoint(
        folder,
        step=step,
        method=run.spec.params.method,
        trainable_state=run.trainable.trainable_state(),
        optimizer=run.optimizer,
        lr_scheduler=run.lr_scheduler,
        grad_scaler=run.scaler,
    )
    # The hooks upload it; the local copy of the one before is then no longer needed.
    run.hooks.save_checkpoint(step=step, folder=folder)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def _resume(run: _Run) -> int | None:
    found = run.hooks.load_checkpoint()
    if found is None:
        return None
    step, folder = found
    loaded, tensors = checkpoint.load_checkpoint(
        folder,
        method=run.spec.params.method,
        optimizer=run.optimizer,
        lr_scheduler=run.lr_scheduler,
        grad_scaler=run.scaler,
    )
    if loaded != step:
        raise checkpoint.CheckpointError(f"{folder}: holds step {loaded}, the owner recorded {step}")
    run.trainable.load_trainable_state(tensors)
    log.info("resumed from the checkpoint at step %d", step)
    return step


def _samples(run: _Run, step: int) -> None:
    prompts = run.training.sample_prompts
    run.trainable.eval()
    try:
        with run.autocast():
            images = run.trainable.sample(prompts, seed=run.training.seed, size=run.resolution)
    finally:
        run.trainable.train()
    run.hooks.save_samples(step=step, images=images, prompts=prompts)


def _loop(run: _Run, start: int) -> tuple[float, float, list[tuple[int, float]]]:
    """Steps start+1..max_steps; returns (last reported loss, overall images/s, loss history)."""
    training, hooks = run.training, run.hooks
    total = training.max_steps
    params = run.trainable.trainable_parameters()
    meter, history, last_loss = _Meter(run.device), [], float("nan")
    previous_checkpoint: Path | None = None
    # About 100 points make the loss curve; one host sync per point, not per step.
    curve_every = max(1, total // 100)
    run.trainable.train()
    for step in range(start, total):
        loss, images = _optimizer_step(run, step, params)
        meter.add(loss, images)
        done = step + 1
        report = done == total or hooks.should_report(done)
        if report or done % curve_every == 0:
            last_loss, rate = meter.flush()
            history.append((done, last_loss))
            if report:
                hooks.progress(step=done, total=total, loss=last_loss, images_per_s=rate)
        if training.checkpoint_every and done % training.checkpoint_every == 0 and done < total:
            with meter.paused():
                previous_checkpoint = _save_checkpoint(run, done, previous_checkpoint)
        sample_due = training.sample_every and done % training.sample_every == 0
        if training.sample_prompts and (sample_due or done == total):
            with meter.paused():
                _samples(run, done)
    return last_loss, meter.overall_rate(), history


def _cache(
    base: Any,
    trainable: Trainable,
    items: list[TrainingItem],
    training: TrainingParams,
    resolution: int,
    device: torch.device,
    *,
    seed_offset: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> TrainingData:
    return build_training_data(
        base=base,
        items=items,
        resolution=resolution,
        random_flip=training.random_flip,
        encode_captions=not trainable.text_encoder_trains,
        batch_size=training.batch_size,
        seed=training.seed + seed_offset,
        noise_offset=training.noise_offset,
        device=device,
        image_features=trainable.image_features,
        on_progress=on_progress,
    )


def train(
    *,
    spec: JobSpec,
    base: Any,
    items: list[CaptionedImage],
    workdir: Path,
    hooks: TrainingHooks,
    device: torch.device,
    name: str = "atelier",
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `spec` on `items`; write the artifact (and its manifest, last) under workdir/artifact.

    `base` is best loaded in fp32: frozen weights are cast here to the training precision, trainable
    ones kept in fp32. `StopTraining` raised by the hooks propagates to the caller. `name` is the
    file stem of the exports (A1111 prompts refer to a LoRA by it). `initial_state` sets some
    trainable tensors before the first step (a hyper_lora's predicted LoRA); a checkpoint still wins.
    """
    training = spec.training
    method = get_method(spec.params.method)
    precision = resolve_precision(training.mixed_precision, device)
    resolution = training.resolution or base.resolution
    torch.manual_seed(training.seed)  # adapter initialisation is part of the run's determinism
    _freeze(base)
    trainable = method.build(base, spec.params, training, device=device)
    if initial_state is not None:  # a start other than the method's own init (init_from)
        trainable.load_initial_state(initial_state)
    _prepare_models(base, trainable, device, precision, training)
    with torch.no_grad(), autocast(device, precision):
        # Methods may generate here (DreamBooth's class images) with the base as it is before training.
        training_set = trainable.training_items(items, resolution=resolution, hooks=hooks)
    # Outside autocast: the VAE encodes the cache in fp32.
    instances, to_cache = len(training_set.items), len(training_set.items) + len(training_set.prior or ())
    hooks.phase("caching_latents", done=0, total=to_cache)
    cached = phase_reporter(hooks, "caching_latents", total=to_cache)
    data: TrainingData | PairedData = _cache(
        base, trainable, training_set.items, training, resolution, device, on_progress=cached
    )
    if training_set.prior:
        cached = phase_reporter(hooks, "caching_latents", total=to_cache, offset=instances)
        prior = _cache(
            base,
            trainable,
            training_set.prior,
            training,
            resolution,
            device,
            seed_offset=1,
            on_progress=cached,
        )
        data = PairedData(data, prior)
    optimizer, lr_scheduler = make_optimizer(trainable.trainable_parameters(), training, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    run = _Run(
        spec, trainable, data, optimizer, lr_scheduler, scaler, precision, device, hooks, workdir, resolution
    )
    resumed = _resume(run)
    hooks.phase("training", done=min(resumed or 0, training.max_steps), total=training.max_steps)
    final_loss, rate, history = _loop(run, min(resumed or 0, training.max_steps))
    hooks.phase("exporting", done=0, total=1)
    artifact_dir = workdir / "artifact"
    files = trainable.save(artifact_dir)
    exports, export_errors = write_exports(
        method.name,
        artifact_dir,
        ExportContext(base.path, spec.base_model, base.family, spec.params, training, name),
    )
    write_manifest(
        artifact_dir,
        method=method.name,
        base_model=spec.base_model,
        base_family=base.family,
        base_architecture=architecture_of_folder(Path(base.path)),
        params=spec.params.model_dump(mode="json"),
        training=training.model_dump(mode="json"),
        metrics={
            "steps": training.max_steps,
            "final_loss": final_loss if math.isfinite(final_loss) else None,
            "images_per_s": rate,
            "resumed_from_step": resumed,
            "images": data.image_count,
            # (step, loss) at each report point since this attempt started: the loss curve.
            "loss_history": [[step, loss] for step, loss in history],
        },
        artifact_format=method.artifact_format,
        exports=exports,
        export_errors=export_errors,
    )
    hooks.phase("exporting", done=1, total=1)
    return TrainResult(
        artifact_dir,
        [*files, "manifest.json"],
        training.max_steps,
        final_loss,
        resumed,
        rate,
        history,
        exports,
    )
