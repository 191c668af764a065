"""A job request: base, dataset, the method's params, training settings and an optional `init_from`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from core.spec.base import StrictModel, field_error
from core.spec.catalogue import CATALOGUE, MethodParams
from core.spec.training import TrainingParams


class InitFrom(StrictModel):
    """Where a lora job's adapters start: the LoRA a hyper_lora predicts from reference images."""

    hyper_lora: str = Field(pattern=r"^art_[0-9a-f]+$", max_length=64, description="A hyper_lora artifact id")
    images: list[Annotated[str, Field(pattern=r"^img_[0-9a-f]+$", max_length=64)]] = Field(
        min_length=1, max_length=5, description="1-5 reference images of the concept (POST /v1/images ids)"
    )


class JobSpec(StrictModel):
    """What a job trains; stored on the job row and handed to the worker as-is."""

    base_model: str = Field(min_length=1, max_length=200)
    dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Required, except with init_from: the reference images are then the training set",
    )
    params: MethodParams
    training: TrainingParams = Field(default_factory=TrainingParams)
    init_from: InitFrom | None = Field(None, description="lora only: start from a hyper_lora's prediction")

    @model_validator(mode="after")
    def _init_from(self) -> JobSpec:
        if self.init_from is not None and self.params.method != "lora":
            raise field_error("/init_from", "init_from starts lora jobs only (params.method must be lora)")
        if self.init_from is None and self.dataset_id is None:
            raise field_error("/dataset_id", "dataset_id is required (only init_from may leave it out)")
        if self.init_from is None and self.training.max_steps == 0:
            raise field_error("/training/max_steps", "must be at least 1 (0 only with init_from)")
        return self


def method_schemas() -> dict[str, dict]:
    """JSON schema per method, for GET /v1/methods."""
    return {
        name: {
            "name": name,
            "summary": entry.summary,
            "dataset_kind": entry.dataset_kind,
            "min_images": entry.min_images,
            "params": entry.params.model_json_schema(),
            "training": TrainingParams.model_json_schema(),
        }
        for name, entry in CATALOGUE.items()
    }
