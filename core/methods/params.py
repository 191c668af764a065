"""Job request parameters: pydantic only, no torch, so the API validates before any GPU time.

`params` is a discriminated union on `method`; each method adds its own model here and its name to
`MethodName`. `training` is shared by every method and drives the one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MethodName = Literal["lora"]


class StrictModel(BaseModel):
    # Unknown fields are errors: a typo such as "learnig_rate" must not silently train with defaults.
    # NaN/inf are refused for every float field, before range checks can give a confusing message.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraParams(StrictModel):
    """Low-rank adapters (peft) on the UNet attention projections, optionally conv/ff and the text encoder."""

    method: Literal["lora"] = "lora"
    rank: int = Field(4, ge=1, le=256, description="LoRA rank r")
    alpha: float | None = Field(
        None, gt=0, le=1024, description="LoRA alpha; the update is scaled by alpha/rank. Default: rank."
    )
    targets: Literal["attention", "attention+conv+ff"] = Field(
        "attention", description="UNet modules: attention projections, or also resnet convs and feed-forward"
    )
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder(s)")
    text_encoder_rank: int | None = Field(None, ge=1, le=256, description="Default: rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


MethodParams = Annotated[LoraParams, Field(discriminator="method")]


@dataclass(frozen=True)
class MethodInfo:
    """What the API needs to know of a method without importing torch."""

    name: str
    params: type[StrictModel]
    dataset_kind: str
    min_images: int
    summary: str


METHOD_INFO: dict[str, MethodInfo] = {
    "lora": MethodInfo(
        "lora", LoraParams, "images+captions", 1, "Low-rank adapters on the UNet (and text encoder)"
    ),
}


class TrainingParams(StrictModel):
    max_steps: int = Field(500, ge=1, le=100_000)
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


class JobSpec(StrictModel):
    """What a job trains; stored on the job row and handed to the worker as-is."""

    base_model: str = Field(min_length=1, max_length=200)
    dataset_id: str = Field(min_length=1, max_length=64)
    params: MethodParams
    training: TrainingParams = Field(default_factory=TrainingParams)


def method_schemas() -> dict[str, dict]:
    """JSON schema per method, for GET /v1/methods."""
    return {
        name: {
            "name": name,
            "summary": info.summary,
            "dataset_kind": info.dataset_kind,
            "min_images": info.min_images,
            "params": info.params.model_json_schema(),
            "training": TrainingParams.model_json_schema(),
        }
        for name, info in METHOD_INFO.items()
    }
