"""The memory planner: a job's peak accelerator memory, predicted before it is queued.

Torch-free, so the API can answer "does this fit?" before any GPU time. A job's peak is

    weights (frozen ones in the training dtype, trained ones and the VAE in fp32)
  + optimizer state (AdamW 8 B, 8-bit AdamW 2 B per trained parameter; Adafactor keeps factored
    moments: nothing per matrix element, 2/3 of each 3x3 kernel, all of every vector)
  + max(gradients (4 B per trained parameter) + autocast's low-precision copies of trained weights,
        activations saved for backward)
  + a workspace term.

Parameter counts are exact (core/training/param_counts.py, from the components' configs; tests
compare them with diffusers' and transformers' own classes). Activations are a sum over the UNet's
blocks, each block's saved bytes proportional to its width times the tokens at its level:

    batch * sum_level tokens(level) * (K_res * (c_in + c_out) per resnet + K_tf * width per
    transformer layer)  [+ the text encoders' layers when they carry gradients]

with the bytes-per-element constants `K_res`, `K_tf` per method and checkpointing mode (in each
method's catalogue entry, core/spec/catalogue.py, with the rest of what it counts) measured, not
guessed: `bench/realsize.py` runs real steps of every method on the SD1.5 and SDXL
architectures at two resolutions and records the peak of live tensor bytes (a dispatch-mode count
on the CPU, `max_memory_allocated` on CUDA); the per-pixel slope gives these constants. The peak
of caching (the VAE encoding images in fp32, a few at a time) is planned too: at 1024 px it can
exceed the training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.bases.architectures import CLIP_TOKENS, Architecture
from core.spec.catalogue import CATALOGUE, Coefficients, MemoryTerms
from core.spec.job import JobSpec
from core.spec.training import TrainingParams
from core.training.param_counts import (
    TRAINED_COUNTS,
    Params,
    image_encoder_params,
    text_encoder_params,
    unet_blocks,
    unet_params,
    vae_params,
)

GIB = 1024**3
# Images the VAE encodes at once while caching, scaled so each chunk holds about two 512 px images
# (core/training/caching.py reads the same function).
ENCODE_PIXELS = 2 * 512 * 512


def encode_chunk(pixels: int) -> int:
    """Images per VAE call while caching, for images of `pixels` pixels."""
    return max(1, min(8, ENCODE_PIXELS // pixels))


# --- what a job trains and keeps ------------------------------------------------------------------
def _terms(spec: JobSpec) -> MemoryTerms:
    return CATALOGUE[spec.params.method].memory


def trained_params(spec: JobSpec, arch: Architecture) -> Params:
    return TRAINED_COUNTS[_terms(spec).trained](spec.params, arch)


def frozen_bytes(spec: JobSpec, arch: Architecture, weight_bytes: int) -> int:
    """The base's weights as the loop keeps them: VAE fp32, frozen components at `weight_bytes`,
    trained components (counted with the trained parameters) not at all; IP-Adapter's image
    encoder in fp32."""
    trained, terms = spec.params.trained_components(), _terms(spec)
    total = vae_params(arch.vae).total * 4
    if "unet" not in trained or terms.unet_copy:
        total += unet_params(arch.unet).total * weight_bytes
    for i, te in enumerate(arch.text_encoders):
        name = ("text_encoder", "text_encoder_2")[i]
        if name not in trained:
            total += text_encoder_params(te, projection=i == 1).total * weight_bytes
    if terms.image_encoder and arch.image_encoder:
        total += image_encoder_params(arch.image_encoder).total * 4
    return total


def optimizer_bytes(name: str, p: Params) -> int:
    if name == "adamw":
        return 8 * p.total
    if name == "adamw_8bit":
        return 2 * p.total
    # Adafactor: a row and a column per matrix (negligible), 6 of 9 per 3x3 kernel, whole vectors.
    return 4 * (p.vector + (2 * p.conv) // 3)


@dataclass(frozen=True)
class Activations:
    """Per sample: sum of (c_in + c_out) * tokens over resnets, width * tokens over transformer
    layers (ControlNet's copy counted again), and width * 77 over text-encoder layers."""

    resnet: float
    transformer: float
    text: float


def activation_sums(spec: JobSpec, arch: Architecture, resolution: int) -> Activations:
    tokens0 = (resolution // arch.vae_factor) ** 2
    resnet = transformer = 0.0
    part = "all"
    terms = _terms(spec)
    passes = [part, "down+mid"] if terms.unet_copy else [part]
    for which in passes:
        for block in unet_blocks(arch.unet, part=which):
            tokens = tokens0 / 4**block.level
            if block.kind == "resnet":
                resnet += (block.c_in + block.c_out) * tokens
            elif block.kind == "transformer":
                transformer += block.c_out * block.layers * tokens
    carries = terms.text_encoder_grads or getattr(spec.params, "train_text_encoder", False)
    text = (
        sum(te["hidden_size"] * te["num_hidden_layers"] * CLIP_TOKENS for te in arch.text_encoders)
        if carries
        else 0.0
    )
    return Activations(resnet, transformer, text)


# --- the estimate ----------------------------------------------------------------------------------
# (method, gradient checkpointing) -> coefficients, as the catalogue states them; the module docstring
# says how they were measured. A dict so that bench/fit_memory.py can check a fresh fit in place.
ACTIVATION_COEFFICIENTS: dict[tuple[str, bool], Coefficients] = {
    (name, checkpointing): entry.memory.activations(checkpointing)
    for name, entry in CATALOGUE.items()
    for checkpointing in (False, True)
}
# Tensors of (encode chunk x pixels x the VAE's first width) the fp32 VAE keeps alive at once while
# encoding (and, one image at a time, decoding samples and class images).
VAE_LIVE_TENSORS = 5.0
# Not in the allocator's count, but on the card: the CUDA context, cuBLAS/cuDNN workspaces and
# fragmentation. A job fits a worker when its estimate plus this reserve fits the worker's memory.
RESERVE_BYTES = GIB + GIB // 2


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    # Where the peak falls: "step" (training), "caching" (VAE encoding, class images) or "loading"
    # (ControlNet's copy of the still-fp32 UNet).
    phase: str
    parts: dict[str, int]

    def to_public(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 2),
            "phase": self.phase,
            "parts": dict(self.parts),
        }


def _precision(training: TrainingParams, device: str) -> tuple[int, bool]:
    """(bytes per frozen weight, autocast on) as core.training.optim.resolve_precision decides."""
    mode = training.mixed_precision
    if device == "cuda":
        return (4, False) if mode == "no" else (2, True)
    if mode != "bf16":
        return (4, False)
    # A CPU worker runs bf16 only where the CPU has it natively (resolve_precision says why). CPU
    # workers are local runs, where the planner's host is the worker's: its CPU stands for theirs.
    from core.cpu_features import cpu_has_native_bf16

    return (2, True) if cpu_has_native_bf16() else (4, False)


def coefficients(method: str, checkpointing: bool) -> Coefficients:
    return ACTIVATION_COEFFICIENTS[(method, checkpointing)]


def estimate(
    spec: JobSpec, arch: Architecture, *, device: str = "cuda", images: int | None = None
) -> MemoryEstimate:
    """Peak tensor memory of `spec` on `arch` (bytes), as `torch.cuda.max_memory_allocated` counts.
    `images`: the dataset's size, where known (a small dataset is VAE-encoded in fewer at once)."""
    training = spec.training
    weight_bytes, autocast = _precision(training, device)
    resolution = training.resolution or arch.resolution
    trained = trained_params(spec, arch)
    frozen = frozen_bytes(spec, arch, weight_bytes)
    optimizer = optimizer_bytes(training.optimizer, trained)
    gradients = 4 * trained.total
    copies = 2 * (trained.conv + trained.matrix) if autocast else 0
    sums = activation_sums(spec, arch, resolution)
    k = coefficients(spec.params.method, training.gradient_checkpointing)
    samples = training.batch_size * (2 if getattr(spec.params, "prior_preservation", False) else 1)
    scale = 1.0 if autocast else 2.0  # fp32 activations take twice bf16's bytes
    activations = int(
        samples * scale * (k.resnet * sums.resnet + k.transformer * sums.transformer + k.text * sums.text)
    )
    step = frozen + 4 * trained.total + optimizer + max(gradients, activations + copies)
    c0 = int(arch.vae["block_out_channels"][0])
    views = images * (2 if training.random_flip else 1) if images else None
    chunk = min(encode_chunk(resolution * resolution), views or 8)
    vae = int(VAE_LIVE_TENSORS * chunk * resolution * resolution * c0 * 4)
    caching = frozen + 4 * trained.total + vae
    parts = {
        "weights": frozen,
        "trained_weights": 4 * trained.total,
        "optimizer_state": optimizer,
        "gradients": gradients,
        "autocast_copies": copies,
        "activations": activations,
        "vae_encoding": vae,
    }
    # ControlNet is copied from the fp32 UNet (as diffusers' recipe does) before the UNet is cast.
    unet_fp32 = (4 - weight_bytes) * unet_params(arch.unet).total if _terms(spec).unet_copy else 0
    loading = frozen + 4 * trained.total + unet_fp32
    phases = {"step": step, "caching": caching, "loading": loading}
    phase = max(phases, key=lambda name: phases[name])
    return MemoryEstimate(phases[phase], phase, parts)


# --- fitting a job to a worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    field: str  # a JSON path into the job, e.g. "training.gradient_checkpointing"
    before: Any
    after: Any
    reason: str
    peak_bytes_after: int

    def to_public(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "from": self.before,
            "to": self.after,
            "reason": self.reason,
            "peak_bytes_after": self.peak_bytes_after,
        }


@dataclass(frozen=True)
class FitPlan:
    fits: bool
    capacity_bytes: int
    estimate: MemoryEstimate  # of `spec`, after the changes
    spec: JobSpec  # the job as it would run: the original, or with `changes` applied
    changes: list[Change]

    def to_public(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "capacity_bytes": self.capacity_bytes,
            "reserve_bytes": RESERVE_BYTES,
            "estimate": self.estimate.to_public(),
            "changes": [c.to_public() for c in self.changes],
        }


def fits(estimate_: MemoryEstimate, capacity_bytes: int) -> bool:
    return estimate_.peak_bytes + RESERVE_BYTES <= capacity_bytes


def _with_training(spec: JobSpec, **changes: Any) -> JobSpec:
    training = spec.training.model_copy(update=changes)
    return spec.model_copy(update={"training": training})


def plan_fit(
    spec: JobSpec,
    arch: Architecture,
    capacity_bytes: int,
    *,
    auto: bool,
    optimizers: frozenset[str] = frozenset({"adamw", "adafactor"}),
    device: str = "cuda",
) -> FitPlan:
    """Does `spec` fit `capacity_bytes`? With `auto`, the smallest series of changes that makes it
    fit: gradient checkpointing, then 8-bit (where workers have bitsandbytes) or factored optimizer
    state, then smaller micro-batches with more accumulation (the same effective batch)."""
    current = estimate(spec, arch, device=device)
    if fits(current, capacity_bytes) or not auto:
        return FitPlan(fits(current, capacity_bytes), capacity_bytes, current, spec, [])
    changes: list[Change] = []

    def apply(new_spec: JobSpec, field_name: str, before: Any, after: Any, reason: str) -> bool:
        nonlocal spec, current
        spec, current = new_spec, estimate(new_spec, arch, device=device)
        changes.append(Change(field_name, before, after, reason, current.peak_bytes))
        return fits(current, capacity_bytes)

    training = spec.training
    if not training.gradient_checkpointing:
        reason = "gradient checkpointing: recompute activations in backward instead of keeping them"
        if apply(
            _with_training(spec, gradient_checkpointing=True),
            "training.gradient_checkpointing",
            False,
            True,
            reason,
        ):
            return FitPlan(True, capacity_bytes, current, spec, changes)
    if training.optimizer == "adamw":
        # 8-bit AdamW keeps Adam's behaviour at a quarter of its state; Adafactor's factored state is
        # smaller still, so it is the choice where 8-bit is missing or not enough.
        choices = [c for c in ("adamw_8bit", "adafactor") if c in optimizers | {"adafactor"}]
        for choice in choices:
            trial = _with_training(spec, optimizer=choice)
            if fits(estimate(trial, arch, device=device), capacity_bytes) or choice == choices[-1]:
                kind = "8-bit" if choice == "adamw_8bit" else "factored"
                reason = f"{kind} optimizer state instead of AdamW's two fp32 moments"
                if apply(trial, "training.optimizer", "adamw", choice, reason):
                    return FitPlan(True, capacity_bytes, current, spec, changes)
                break
    batch, accumulation = spec.training.batch_size, spec.training.gradient_accumulation_steps
    for micro in sorted((m for m in range(1, batch) if batch % m == 0), reverse=True):
        steps = accumulation * batch // micro
        if steps > 64:
            break
        trial = _with_training(spec, batch_size=micro, gradient_accumulation_steps=steps)
        if fits(estimate(trial, arch, device=device), capacity_bytes) or micro == 1:
            reason = (
                f"micro-batches of {micro} with {steps} accumulation steps: "
                f"the same {batch * accumulation} images per optimizer step"
            )
            apply(trial, "training.batch_size", batch, micro, reason)
            accumulated = Change(
                "training.gradient_accumulation_steps", accumulation, steps, reason, current.peak_bytes
            )
            changes.append(accumulated)
            break
    return FitPlan(fits(current, capacity_bytes), capacity_bytes, current, spec, changes)
