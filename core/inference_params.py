"""Generation request parameters (torch-free): validated by the API, executed by the generate worker."""

from __future__ import annotations

from pydantic import Field, field_validator

from core.methods.params import StrictModel


class LoraRef(StrictModel):
    artifact_id: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class GenerationSpec(StrictModel):
    base_model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    width: int | None = Field(None, ge=8, le=2048, description="Default: the base model's native size")
    height: int | None = Field(None, ge=8, le=2048, description="Default: the base model's native size")
    num_images: int = Field(1, ge=1, le=8)
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value
