"""The ground the request models stand on: strict models, field-pointed errors, method params' base."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

# A token users put in prompts: one word, printable, no spaces (A1111 and diffusers key files by it).
TOKEN_PATTERN = r"^[^\s]+$"


def field_error(pointer: str, message: str) -> PydanticCustomError:
    """A model-level check's error about one field: the API's problem+json points at `pointer`
    (relative to the model, e.g. "/training/max_steps") instead of at the whole model."""
    return PydanticCustomError("value_error", message, {"field_pointer": pointer})


class StrictModel(BaseModel):
    # Unknown fields are errors: a typo such as "learnig_rate" must not silently train with defaults.
    # NaN/inf are refused for every float field, before range checks can give a confusing message.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class MethodParamsBase(StrictModel):
    def dataset_problems(self, report: dict[str, Any]) -> list[str]:
        """What the dataset (its validation report) lacks for this method; empty when it fits."""
        return []

    def trained_components(self) -> frozenset[str]:
        """Base components whose own weights train, or seed weights that train (ControlNet copies
        the UNet): these load and stay in fp32; every other component loads directly in the
        training's low-precision dtype. The memory planner reads the same answer."""
        return frozenset()
