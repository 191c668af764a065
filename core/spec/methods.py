"""Each method's params model (pydantic only: the API validates jobs with them).

A method adds its params model here; its entry in core/spec/catalogue.py puts it in the union.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.spec.base import TEXT_ENCODER_NAMES, TOKEN_PATTERN, MethodParamsBase


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
