"""Precision and optimizers for the loop: which dtype frozen weights keep, whether autocast and a
grad scaler run, and which optimizer steps the trainable parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from core import cpu_features
from core.errors import MethodInputError
from core.spec.training import TrainingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    weight_dtype: torch.dtype  # frozen weights; trainable parameters are always fp32
    autocast_dtype: torch.dtype | None

    @property
    def grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        return self.autocast_dtype == torch.float16


def resolve_precision(mode: str, device: torch.device) -> Precision:
    if device.type != "cuda":
        # CPU autocast runs bf16 where the CPU has it natively (oneDNN on AVX-512/AMX); on an AVX2
        # host torch emulates it at 1/100-1/250 of fp32's speed, so fp32 it is. fp16 has no CPU
        # path worth having. "auto" stays fp32 on the CPU: exact, and what the tiny bases' tests expect.
        if mode == "bf16" and cpu_features.cpu_has_native_bf16():
            return Precision(torch.bfloat16, torch.bfloat16)
        if mode == "bf16":
            log.warning("mixed precision bf16: this CPU has no native bf16 (emulated: >100x slower); fp32")
        if mode == "fp16":
            log.info("mixed precision fp16 ignored on %s: training in fp32", device)
        return Precision(torch.float32, None)
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return Precision(dtype or torch.float32, dtype)


def component_dtypes(params: Any, precision: Precision) -> dict[str, torch.dtype]:
    """The dtype each base component loads in: frozen ones directly in the low-precision dtype (no
    fp32 copy ever reaches the device), trained ones in fp32, the VAE in fp32 (it encodes the cache)."""
    trained = params.trained_components()
    names = ("unet", "text_encoder", "text_encoder_2")
    return {"vae": torch.float32} | {
        name: torch.float32 if name in trained else precision.weight_dtype for name in names
    }


def make_optimizer(
    params: list[torch.nn.Parameter], training: TrainingParams, device: torch.device
) -> tuple[torch.optim.Optimizer, Any]:
    from diffusers.optimization import get_scheduler

    if not params:
        raise ValueError("the method marked no parameters as trainable")
    optimizer = _build_optimizer(training.optimizer, params, training.learning_rate, device)
    lr_scheduler = get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.warmup_steps,
        num_training_steps=training.max_steps,
    )
    return optimizer, lr_scheduler


def _build_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    if name == "adamw_8bit":
        # 8-bit moments: a quarter of AdamW's optimizer memory, what full fine-tunes need on 24 GB.
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise MethodInputError(
                "optimizer_unavailable",
                "optimizer adamw_8bit needs bitsandbytes, not installed on this worker",
            ) from None
        if device.type != "cuda":
            raise MethodInputError("optimizer_unavailable", "optimizer adamw_8bit needs a CUDA device")
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "adafactor":
        # Factored second moments (row + column) instead of a full copy of every weight.
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    # Fused AdamW: one kernel for all parameters instead of a loop over them (CUDA and CPU alike).
    return torch.optim.AdamW(params, lr=lr, fused=device.type in ("cuda", "cpu"))


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    dtype = precision.autocast_dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
