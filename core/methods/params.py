"""Job request parameters: pydantic only, no torch, so the API validates before any GPU time.

`params` is a discriminated union on `method`; each method adds its own model here and its name to
`MethodName`. `training` is shared by every method and drives the one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MethodName = Literal[
    "lora", "dreambooth", "textual_inversion", "hypernetwork", "controlnet", "ip_adapter", "hyper_lora"
]
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


class LoraParams(MethodParamsBase):
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


class DreamBoothParams(MethodParamsBase):
    """Full UNet fine-tune (text encoder optional) with prior preservation (Ruiz et al. 2023)."""

    method: Literal["dreambooth"] = "dreambooth"
    instance_prompt: str = Field(
        min_length=1, max_length=500, description='Prompt with the identifier, e.g. "a photo of sks dog"'
    )
    prior_preservation: bool = True
    class_prompt: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description='e.g. "a photo of a dog"; needed for prior preservation',
    )
    num_class_images: int = Field(100, ge=1, le=2000, description="Class images the worker generates")
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0)
    class_inference_steps: int = Field(25, ge=1, le=150, description="Sampling steps per class image")
    train_text_encoder: bool = False

    @model_validator(mode="after")
    def _prior(self) -> DreamBoothParams:
        if self.prior_preservation and not self.class_prompt:
            raise ValueError("class_prompt is required when prior_preservation is on")
        if self.class_prompt is not None and self.class_prompt.strip() == self.instance_prompt.strip():
            raise ValueError("class_prompt must differ from instance_prompt (it has no identifier)")
        return self

    def trained_components(self) -> frozenset[str]:
        return frozenset({"unet", *(TEXT_ENCODER_NAMES if self.train_text_encoder else ())})


class TextualInversionParams(MethodParamsBase):
    """New token embedding rows only (Gal et al. 2022); every other weight stays bit-identical."""

    method: Literal["textual_inversion"] = "textual_inversion"
    placeholder_token: str = Field(
        min_length=1, max_length=40, pattern=TOKEN_PATTERN, description='The new token, e.g. "<my-cat>"'
    )
    initializer_token: str = Field(
        min_length=1,
        max_length=40,
        pattern=TOKEN_PATTERN,
        description="Word whose embedding starts the new rows",
    )
    num_vectors: int = Field(1, ge=1, le=16, description="Embedding vectors behind the token")
    learnable_property: Literal["object", "style"] = Field(
        "object", description="Which prompt templates train it: 'a photo of a {}' or 'in the style of {}'"
    )

    @model_validator(mode="after")
    def _distinct(self) -> TextualInversionParams:
        if self.placeholder_token == self.initializer_token:
            raise ValueError("placeholder_token must differ from initializer_token")
        # CLIP tokenizers lower-case the prompt before diffusers looks for `tok_1`, so a capitalised
        # multi-vector token would be used at generation with its first vector only.
        if self.num_vectors > 1 and self.placeholder_token != self.placeholder_token.lower():
            raise ValueError("placeholder_token must be lower case when num_vectors > 1")
        return self


class HypernetworkParams(MethodParamsBase):
    """AUTOMATIC1111's hypernetwork: per context width, MLPs on the context before to_k and to_v."""

    method: Literal["hypernetwork"] = "hypernetwork"
    layer_structure: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 1.0],
        min_length=2,
        max_length=8,
        description="Layer widths as multiples of the context width; starts and ends with 1",
    )
    activation: Literal["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"] = "linear"
    layer_norm: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer")
    weight_init: Literal["normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"] = (
        "normal"
    )
    activate_output: bool = False

    @field_validator("layer_structure")
    @classmethod
    def _structure(cls, value: list[float]) -> list[float]:
        if value[0] != 1 or value[-1] != 1:
            raise ValueError("must start and end with 1")
        if any(not 0 < width <= 16 for width in value):
            raise ValueError("every width must be in (0, 16]")
        return value


class ControlNetParams(MethodParamsBase):
    """A ControlNet (Zhang et al. 2023) copied from the base UNet, zero-initialised outputs."""

    method: Literal["controlnet"] = "controlnet"
    conditioning: Literal["provided", "canny"] = Field(
        "provided",
        description="provided: the dataset's conditioning/ images; canny: edge maps the worker computes",
    )
    canny_low_threshold: int = Field(100, ge=0, le=255)
    canny_high_threshold: int = Field(200, ge=0, le=255)
    conditioning_embedding_out_channels: list[int] | None = Field(
        None,
        min_length=1,
        max_length=6,
        description="Default: (16, 32, 96, 256) cut to the VAE's downsampling (one more entry per halving)",
    )
    proportion_empty_prompts: float = Field(
        0.0, ge=0.0, le=1.0, description="Captions dropped to train guidance"
    )

    @model_validator(mode="after")
    def _thresholds(self) -> ControlNetParams:
        if self.canny_low_threshold > self.canny_high_threshold:
            raise ValueError("canny_low_threshold must not exceed canny_high_threshold")
        return self

    def trained_components(self) -> frozenset[str]:
        return frozenset({"unet"})  # from_unet copies its weights: a bf16 copy would round them

    def dataset_problems(self, report: dict[str, Any]) -> list[str]:
        if self.conditioning != "provided":
            return []
        missing = [a["name"] for a in report.get("accepted", []) if not a.get("conditioning")]
        if not missing:
            return []
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return [
            f"{len(missing)} image(s) have no conditioning image ({shown}); upload conditioning/ images "
            'with the same names, or ask for params.conditioning = "canny"'
        ]


class IPAdapterParams(MethodParamsBase):
    """IP-Adapter (Ye et al. 2023): image projection + decoupled cross-attention, frozen CLIP encoder."""

    method: Literal["ip_adapter"] = "ip_adapter"
    # diffusers' `load_ip_adapter` reads a `proj.weight` image projection as 4 tokens, always (as the
    # original ImageProjModel checkpoints are): any other count would not load, so it is fixed.
    num_tokens: Literal[4] = Field(4, description="Context tokens the image embedding becomes")
    drop_image_rate: float = Field(0.05, ge=0.0, le=1.0)
    drop_text_rate: float = Field(0.05, ge=0.0, le=1.0)
    drop_both_rate: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _rates(self) -> IPAdapterParams:
        if self.drop_image_rate + self.drop_text_rate + self.drop_both_rate > 1.0:
            raise ValueError("the three drop rates must sum to at most 1")
        return self


# A hyper_lora dataset: one folder per concept (`<concept>/x.png`, or `<root>/<concept>/x.png` when
# the zip wraps everything in one folder), at least this many concepts with this many images each.
MIN_CONCEPTS = 4
MIN_IMAGES_PER_CONCEPT = 2
# What hyper_lora reads of each image token, side by side (core/methods/hyper_lora.py): the image
# encoder's patch embeddings before its first LayerNorm, and its last hidden state.
HYPER_LORA_FEATURES = ("patch_embeddings", "last_hidden_state")


def concept_of(name: str) -> str | None:
    """The concept folder of a dataset file name; None for a file at the top level."""
    parts = name.split("/")
    return parts[-2] if len(parts) > 1 else None


class HyperLoraParams(MethodParamsBase):
    """A network that predicts a LoRA (UNet attention, peft layout) from reference images; trained
    over many concepts, it starts `lora` jobs given `init_from` (HyperDreamBooth, Ruiz et al. 2023)."""

    method: Literal["hyper_lora"] = "hyper_lora"
    rank: int = Field(4, ge=1, le=64, description="Rank of the LoRAs it predicts")
    alpha: float | None = Field(
        None, gt=0, le=1024, description="LoRA alpha of the predictions. Default: rank."
    )
    targets: Literal["attention", "attention+conv+ff"] = Field(
        "attention", description="UNet layers of the LoRAs it predicts (as the lora method's targets)"
    )
    basis_size: int = Field(16, ge=1, le=256, description="Learned low-rank factors per layer it mixes")
    hidden_dim: int = Field(
        128, ge=16, le=2048, multiple_of=4, description="Width of the network over the image tokens"
    )
    instance_prompt: str = Field(
        "a photo of sks",
        min_length=1,
        max_length=500,
        description="Caption of images that have none; personalised LoRAs answer to it",
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def dataset_problems(self, report: dict[str, Any]) -> list[str]:
        counts: dict[str | None, int] = {}
        for accepted in report.get("accepted", []):
            concept = concept_of(accepted["name"])
            counts[concept] = counts.get(concept, 0) + 1
        problems = []
        if None in counts:
            problems.append(
                f"{counts.pop(None)} image(s) are not in a concept folder (put each concept's images "
                "in a folder of its own)"
            )
        small = sorted(c for c, n in counts.items() if c is not None and n < MIN_IMAGES_PER_CONCEPT)
        if small:
            problems.append(
                f"concept folder(s) {', '.join(small[:5])} have fewer than {MIN_IMAGES_PER_CONCEPT} images"
            )
        if len(counts) < MIN_CONCEPTS:
            problems.append(f"{len(counts)} concept folder(s); at least {MIN_CONCEPTS} are needed")
        return problems


MethodParams = Annotated[
    LoraParams
    | DreamBoothParams
    | TextualInversionParams
    | HypernetworkParams
    | ControlNetParams
    | IPAdapterParams
    | HyperLoraParams,
    Field(discriminator="method"),
]


@dataclass(frozen=True)
class MethodInfo:
    """What the API needs to know of a method without importing torch."""

    name: str
    params: type[MethodParamsBase]
    dataset_kind: str
    min_images: int
    summary: str


METHOD_INFO: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            "lora", LoraParams, "captioned_images", 1, "Low-rank adapters on the UNet (and text encoder)"
        ),
        MethodInfo(
            "dreambooth",
            DreamBoothParams,
            "instance_images",
            3,
            "Full UNet fine-tune on a subject, with prior preservation from generated class images",
        ),
        MethodInfo(
            "textual_inversion",
            TextualInversionParams,
            "images",
            1,
            "A new token's embedding, learnt from images and prompt templates",
        ),
        MethodInfo(
            "hypernetwork",
            HypernetworkParams,
            "captioned_images",
            1,
            "AUTOMATIC1111-style MLPs on the cross-attention context",
        ),
        MethodInfo(
            "controlnet",
            ControlNetParams,
            "conditioned_images",
            1,
            "A ControlNet: images, conditioning images (or computed edges) and captions",
        ),
        MethodInfo(
            "ip_adapter",
            IPAdapterParams,
            "captioned_images",
            1,
            "An IP-Adapter: generation guided by a reference image",
        ),
        MethodInfo(
            "hyper_lora",
            HyperLoraParams,
            "concept_images",
            MIN_CONCEPTS * MIN_IMAGES_PER_CONCEPT,
            "Predicts a LoRA from 1-5 reference images (lora jobs start from it via init_from)",
        ),
    )
}


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
    # Read by the API only (core/fitting.py); the loop trains the settings as stored.
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
            "summary": info.summary,
            "dataset_kind": info.dataset_kind,
            "min_images": info.min_images,
            "params": info.params.model_json_schema(),
            "training": TrainingParams.model_json_schema(),
        }
        for name, info in METHOD_INFO.items()
    }
