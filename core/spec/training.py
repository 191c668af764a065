"""`training`: the settings every method shares, which drive the one training loop."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from core.spec.base import StrictModel


class TrainingParams(StrictModel):
    max_steps: int = Field(
        500, ge=0, le=100_000, description="0 only with init_from: the predicted LoRA as it is"
    )
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=100_000)
    batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(1, ge=1, le=64)
    resolution: int | None = Field(
        None, ge=8, le=2048, description="Training side length; default the base model's native size"
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA where supported, fp32 on CPU"
    )
    gradient_checkpointing: bool = False
    checkpoint_every: int | None = Field(None, ge=1, le=100_000, description="Steps between checkpoints")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    sample_prompts: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=8
    )
    sample_every: int | None = Field(None, ge=1, le=100_000, description="Steps between sample images")
    min_snr_gamma: float | None = Field(None, gt=0, le=100, description="Min-SNR weighting (5 is usual)")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    random_flip: bool = False
    max_grad_norm: float = Field(1.0, gt=0, le=1000)
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = Field(
        "adamw", description="adamw_8bit needs bitsandbytes on the worker; adafactor keeps factored moments"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Capture the training step with torch.compile (CUDA graphs on CUDA). on: from the "
        "first step; auto: only when the job's remaining steps repay the compile time, judged from a "
        "few timed eager steps; off: eager (a resumed run is then bit-identical on CPU). Compile time "
        "is reported apart (metrics.compile) and left out of images_per_s",
    )
    # Read by the API only (core/jobs/fitting.py); the loop trains the settings as stored.
    fit: Literal["off", "auto"] = Field(
        "off",
        description="auto: where the job would not fit the largest training worker's memory, Atelier "
        "turns on gradient checkpointing, then 8-bit or factored optimizer state, then smaller "
        "micro-batches with gradient accumulation (same effective batch), and records each change",
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingParams:
        if self.warmup_steps > self.max_steps:
            raise ValueError("warmup_steps must not exceed max_steps")
        return self
