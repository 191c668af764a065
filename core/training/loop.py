"""The one training loop every method shares.

The method supplies a `Trainable` (what trains, how a batch becomes a loss, how to save); this module
owns everything else: precision and device placement, the cached data, AdamW over the trainable
parameters only, the lr schedule, gradient accumulation and clipping, checkpoints, samples, resume
and progress. All randomness after model construction is a function of (seed, step), and a
checkpoint carries the optimizer, scheduler and RNG state, so a resumed run ends bit-identical on CPU.
A step whose loss or gradient is not finite is skipped and counted, and too many end the run
(core/training/meter.py); compiling the step is core/training/compiling.py's.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.spec.job import JobSpec
from core.spec.training import TrainingParams
from core.training import checkpoint, compiling
from core.training import step as step_module
from core.training.caching import (
    CaptionedImage,
    PairedData,
    TrainingData,
    TrainingItem,
    build_training_data,
)
from core.training.meter import Meter, step_if_finite, stop_if_diverged
from core.training.optim import Precision, autocast, make_optimizer, resolve_precision
from core.training.progress import TrainingHooks, phase_reporter
from core.training.run import Run, forward
from core.training.step import CompileStats

if TYPE_CHECKING:  # methods build on the loop's pieces; the loop is handed a method
    from core.methods.base import Method, Trainable

log = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class TrainResult:
    artifact_dir: Path
    files: list[str]  # the primary artifact files, as the trainable saved them
    steps: int
    final_loss: float
    resumed_from_step: int | None
    images_per_s: float
    images: int  # distinct training images, as cached
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    compile: dict[str, Any] = field(default_factory=dict)  # CompileStats.as_dict()
    # Optimizer steps skipped (this attempt) because their loss or gradient was not finite.
    skipped_steps: int = 0


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


def _optimizer_step(
    run: Run, step: int, params: list[torch.nn.Parameter]
) -> tuple[torch.Tensor, int, bool, torch.Tensor]:
    """One optimizer step (0-based `step`) over its micro-batches: (mean loss on device, images,
    whether a micro-batch compiled a new graph, so the step is left out of images/s, and whether
    the step was skipped for a non-finite loss or gradient, on device)."""
    accumulation = run.training.gradient_accumulation_steps
    total = torch.zeros((), device=run.device)
    images, compiled_now = 0, False

    def backward(loss: torch.Tensor) -> None:
        run.scaler.scale(loss / accumulation).backward()

    for micro in range(accumulation):
        batch = run.data.micro_batch(step * accumulation + micro)
        compiled = run.compiled
        if compiled is None:
            loss = forward(run, batch)
            backward(loss)
        elif compiled.is_new(batch):
            loss = compiling.compiling_call(run, compiled, batch, backward)
            compiled_now = True
        else:
            loss = compiled(batch)
            backward(loss)
        total += loss.detach()
        images += len(batch)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.training.max_grad_norm)
    mean = total / accumulation
    skipped = step_if_finite(run.optimizer, run.scaler, mean, grad_norm)
    run.scaler.update()
    # The schedule moves on over a skipped step, as with AMP's: step n always has lr(n), resumed or not.
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return mean, images, compiled_now, skipped


def _save_checkpoint(run: Run, step: int, previous: Path | None) -> Path:
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


def _resume(run: Run) -> int | None:
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


def _samples(run: Run, step: int) -> None:
    prompts = run.training.sample_prompts
    run.trainable.eval()
    try:
        with run.autocast():
            images = run.trainable.sample(prompts, seed=run.training.seed, size=run.resolution)
    finally:
        run.trainable.train()
    run.hooks.save_samples(step=step, images=images, prompts=prompts)


@dataclass
class _Trained:
    """What `_loop` measured over steps start+1..max_steps."""

    last_loss: float  # the last reported loss
    images_per_s: float  # overall
    history: list[tuple[int, float]]
    skipped: int


def _loop(run: Run, start: int) -> _Trained:
    """Steps start+1..max_steps. Raises NonFiniteError("training_diverged") past the skip bounds."""
    training, hooks = run.training, run.hooks
    total = training.max_steps
    params = run.trainable.trainable_parameters()
    meter, history, last_loss, skipped = Meter(run.device), [], float("nan"), 0
    previous_checkpoint: Path | None = None
    # About 100 points make the loss curve; one host sync per point, not per step.
    curve_every = max(1, total // 100)
    run.trainable.train()
    auto = None
    if run.compile_stats.setting == "auto":
        if run.device.type in step_module.AUTO_DEVICES:
            auto = compiling.AutoCompile(run, start)
        else:
            run.compile_stats.reason = f"auto compiles on {' and '.join(step_module.AUTO_DEVICES)} only"
    for step in range(start, total):
        began = time.perf_counter()
        loss, images, compiled_now, step_skipped = _optimizer_step(run, step, params)
        if compiled_now:
            meter.add_untimed(loss, step_skipped, time.perf_counter() - began)
        else:
            meter.add(loss, step_skipped, images)
        done = step + 1
        if auto is not None and auto.after_step(done):
            auto = None
        report = done == total or hooks.should_report(done)
        if report or done % curve_every == 0:
            reading = meter.flush()
            skipped = stop_if_diverged(reading, run.training, done=done, start=start, reported=skipped)
            last_loss = reading.loss
            if last_loss == last_loss:  # not nan: some step since the last point was finite
                history.append((done, last_loss))
            if report:
                hooks.progress(step=done, total=total, loss=last_loss, images_per_s=reading.images_per_s)
        if training.checkpoint_every and done % training.checkpoint_every == 0 and done < total:
            with meter.paused():
                previous_checkpoint = _save_checkpoint(run, done, previous_checkpoint)
        sample_due = training.sample_every and done % training.sample_every == 0
        if training.sample_prompts and (sample_due or done == total):
            with meter.paused():
                _samples(run, done)
    return _Trained(last_loss, meter.overall_rate(), history, skipped)


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
    method: Method,
    spec: JobSpec,
    base: Any,
    items: list[CaptionedImage],
    workdir: Path,
    hooks: TrainingHooks,
    device: torch.device,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `spec` with `method` on `items`; the trained files go under workdir/artifact.

    What was trained comes back; storing it (exports, manifest, upload) is the job layer's
    (core/jobs/artifact.py). `base` is best loaded in fp32: frozen weights are cast here to the
    training precision, trainable ones kept in fp32. `StopTraining` raised by the hooks propagates
    to the caller, and so does NonFiniteError("training_diverged") past the skip bounds.
    `initial_state` sets some trainable tensors before the first step (a hyper_lora's predicted
    LoRA); a checkpoint still wins.
    """
    run = _build_run(method, spec, base, items, workdir, hooks, device, initial_state)
    stats = run.compile_stats
    resumed = _resume(run)
    start = min(resumed or 0, spec.training.max_steps)
    compiling.choose_compile(run, start)
    hooks.phase("training", done=start, total=spec.training.max_steps)
    try:
        trained = _loop(run, start)
    finally:
        compiling.finish_compiling(run)
    hooks.phase("exporting", done=0, total=1)
    artifact_dir = workdir / "artifact"
    files = run.trainable.save(artifact_dir)
    return TrainResult(
        artifact_dir=artifact_dir,
        files=list(files),
        steps=spec.training.max_steps,
        final_loss=trained.last_loss,
        resumed_from_step=resumed,
        images_per_s=trained.images_per_s,
        images=run.data.image_count,
        loss_history=trained.history,
        compile=stats.as_dict(),
        skipped_steps=trained.skipped,
    )


def _build_run(
    method: Method,
    spec: JobSpec,
    base: Any,
    items: list[CaptionedImage],
    workdir: Path,
    hooks: TrainingHooks,
    device: torch.device,
    initial_state: dict[str, torch.Tensor] | None,
) -> Run:
    """The trainable on its base, its data cached, its optimizer: everything `_loop` steps."""
    training = spec.training
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
    stats = CompileStats(setting=training.compile)
    return Run(
        spec,
        trainable,
        data,
        optimizer,
        lr_scheduler,
        scaler,
        precision,
        device,
        hooks,
        workdir,
        resolution,
        stats,
    )
