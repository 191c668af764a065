"""Generation request parameters (torch-free): validated by the API, executed by the generate worker.

A request names its artifacts by field, one field per method. `GenerationSpec.uses()` flattens them
into one list in a fixed order, which both the API's checks and the worker walk, so the two can never
disagree about what a request uses. Images (ControlNet conditioning, IP-Adapter reference) are image
ids from `POST /v1/images` or data URIs; the API stores data URIs as images before the request is
saved, so a stored spec holds only ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from core.spec.base import StrictModel
from core.spec.catalogue import GENERATION_USES, MethodName

# The samplers a request may pick, each made from the base scheduler's own config (betas, prediction
# type, spacing) by core.methods.context.make_scheduler.
SchedulerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m"]
IMAGE_ID = re.compile(r"^img_[0-9a-f]{24}$")  # core.ids.new_id("img")
DATA_URI = re.compile(r"^data:image/(png|jpeg|webp);base64,")


def is_data_uri(image: str) -> bool:
    return image.startswith("data:")


def _image_ref(value: str) -> str:
    if is_data_uri(value):
        if not DATA_URI.match(value):
            raise ValueError("a data URI must start with data:image/png|jpeg|webp;base64,")
    elif not IMAGE_ID.match(value):
        raise ValueError("must be an image id from POST /v1/images (img_...) or a data:image/...;base64, URI")
    return value


ImageRef = Annotated[
    str,
    Field(
        min_length=1,
        description="An image id from POST /v1/images, or a data:image/png|jpeg|webp;base64,... URI",
    ),
    AfterValidator(_image_ref),
]
ArtifactId = Annotated[str, Field(min_length=1, max_length=64)]


class LoraRef(StrictModel):
    artifact_id: ArtifactId
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class DreamBoothRef(StrictModel):
    artifact_id: ArtifactId


class TextualInversionRef(StrictModel):
    artifact_id: ArtifactId


class HypernetworkRef(StrictModel):
    artifact_id: ArtifactId
    strength: float = Field(1.0, ge=0.0, le=4.0, description="Residual strength: x + mlp(x) * strength")


class ControlNetRef(StrictModel):
    artifact_id: ArtifactId
    image: ImageRef = Field(description="The conditioning image: an image id or a data URI")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="controlnet_conditioning_scale")


class IPAdapterRef(StrictModel):
    artifact_id: ArtifactId
    image: ImageRef = Field(description="The reference image: an image id or a data URI")
    scale: float = Field(1.0, ge=0.0, le=4.0)


@dataclass(frozen=True)
class ArtifactRef:
    """One use of one artifact by a request, whatever field it came from."""

    method: MethodName  # the field it is in: the artifact must be of this method
    artifact_id: str
    scale: float  # LoRA scale, hypernetwork strength, ControlNet or IP-Adapter scale; else 1.0
    image: str | None  # image id (or, before the API stored it, a data URI)
    pointer: str  # JSON pointer of the use in the request, e.g. "/controlnet/0", for error messages


class GenerationSpec(StrictModel):
    base_model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Image i uses seed + i, so each image can be made again alone; none: a random seed",
    )
    scheduler: SchedulerName | None = Field(
        None,
        description="ddim, euler, euler_a (Euler ancestral) or dpmpp_2m (DPM++ 2M); default: the base's own",
    )
    width: int | None = Field(None, ge=8, le=2048, description="Default: the base model's native size")
    height: int | None = Field(None, ge=8, le=2048, description="Default: the base model's native size")
    num_images: int = Field(1, ge=1, le=8)
    dreambooth: DreamBoothRef | None = Field(None, description="A DreamBooth UNet in place of the base's")
    textual_inversions: list[TextualInversionRef] = Field(default_factory=list, max_length=8)
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)
    hypernetwork: HypernetworkRef | None = None
    ip_adapter: IPAdapterRef | None = None
    controlnet: list[ControlNetRef] = Field(
        default_factory=list, max_length=4, description="One ControlNet object, or a list of them"
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @field_validator("controlnet", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # A single object is the common case; stored requests always hold the list.
        return [value] if isinstance(value, dict) else value

    @field_validator("textual_inversions")
    @classmethod
    def _distinct(cls, value: list[TextualInversionRef]) -> list[TextualInversionRef]:
        ids = [ref.artifact_id for ref in value]
        if len(set(ids)) != len(ids):
            # Loading the same token twice fails in the pipeline; say so before queueing.
            raise ValueError("the same artifact is listed twice")
        return value

    def _refs(self, field: str) -> list[tuple[str, Any]]:
        """(JSON pointer, ref) of each artifact in request field `field`: one object or a list."""
        value = getattr(self, field)
        if isinstance(value, list):
            return [(f"/{field}/{i}", ref) for i, ref in enumerate(value)]
        return [] if value is None else [(f"/{field}", value)]

    def uses(self) -> list[ArtifactRef]:
        """Every artifact use, in the order the worker applies them (core.spec.catalogue.APPLY_ORDER;
        list fields in request order)."""
        out: list[ArtifactRef] = []
        for method, use in GENERATION_USES.items():
            for pointer, ref in self._refs(use.field):
                scale = getattr(ref, use.weight) if use.weight else 1.0
                image = ref.image if use.image else None
                out.append(ArtifactRef(method, ref.artifact_id, scale, image, pointer))
        return out

    def with_images(self, stored: dict[str, str]) -> GenerationSpec:
        """A copy whose images are replaced by `stored[pointer]` (pointer: "/controlnet/0")."""
        update: dict[str, Any] = {}
        for use in GENERATION_USES.values():
            if not use.image:
                continue
            refs = [
                ref.model_copy(update={"image": stored.get(pointer, ref.image)})
                for pointer, ref in self._refs(use.field)
            ]
            value = getattr(self, use.field)
            update[use.field] = refs if isinstance(value, list) else (refs[0] if refs else None)
        return self.model_copy(update=update)
