"""The method catalogue: one entry per training method, and the only list of methods there is.

An entry states everything the rest of the system needs to know of a method without importing it:
its name, params model, dataset kind, which class implements it, the export formats it offers (and
which function writes each), how a generation request uses its artifacts (request field, order of
application), and the terms the memory planner counts for it. Everything else reads this module:
the params union and `MethodName` below, `GET /v1/methods`, job checks, metrics, `get_method`
(core/methods), exports (core/exports), generation (core/generation, core/methods/context.py) and
the memory planner (core/training/memory.py). tests/test_catalogue.py checks that every consumer
knows every method here and that nothing names a method this catalogue lacks.

Adding a method: its params model (core/spec/methods.py, pydantic only), its implementation file
(core/methods/<name>.py), and one entry below.

It lives in core/spec, not core/methods, because the memory planner (core/training) reads it and
core/training sits below core/methods in the import order; it is plain data (implementations and
exporters are named as "module:attribute" strings, imported only where they run), so the API reads
it without the ML stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field

from core.spec.base import MethodParamsBase
from core.spec.methods import (
    MIN_CONCEPTS,
    MIN_IMAGES_PER_CONCEPT,
    ControlNetParams,
    DreamBoothParams,
    HyperLoraParams,
    HypernetworkParams,
    IPAdapterParams,
    LoraParams,
    TextualInversionParams,
)


@dataclass(frozen=True)
class ExportFormat:
    """A format besides the primary (diffusers) files, written by the worker under exports/<name>/."""

    name: str  # the `?format=` value and the folder under exports/
    description: str  # what a user gets
    exporter: str  # "module:function" (core/exports), `export(artifact_dir, out_dir, ctx) -> [names]`
    aliases: tuple[str, ...] = ()  # the tools a user may name instead (`?format=comfyui`)


@dataclass(frozen=True)
class GenerationUse:
    """How a generation request uses the method's artifacts (core/generation/params.py)."""

    field: str  # the GenerationSpec field naming them: one object, or a list
    order: int  # artifacts are applied in ascending order (see each entry for why it sits there)
    weight: str | None = None  # the ref's field scaling it (LoRA scale, hypernetwork strength ...)
    image: bool = False  # each use carries an image (a ControlNet conditioning or IP-Adapter reference)
    image_encoder: bool = False  # the worker lends its cached CLIP image encoder to the pipeline


@dataclass(frozen=True)
class Coefficients:
    """Saved bytes per element of each activation sum (bf16 autocast), measured by bench/realsize.py."""

    resnet: float
    transformer: float
    text: float


@dataclass(frozen=True)
class ActivationFit:
    """A method's activation coefficients without and with gradient checkpointing."""

    plain: Coefficients
    checkpointed: Coefficients

    def __call__(self, checkpointing: bool) -> Coefficients:
        return self.checkpointed if checkpointing else self.plain


@dataclass(frozen=True)
class MemoryTerms:
    """What the memory planner (core/training/memory.py) counts for a method."""

    trained: str  # how its trained parameters are counted: a key of param_counts.TRAINED_COUNTS
    activations: ActivationFit
    image_encoder: bool = False  # training keeps the frozen CLIP image encoder, in fp32
    text_encoder_grads: bool = False  # gradients always flow through the text encoders
    # It trains a copy of the UNet's down and mid blocks (ControlNetModel.from_unet): the base UNet
    # stays in memory frozen, the copy is made from it while it is still fp32, and the copy's blocks
    # run as a second pass over the latents.
    unet_copy: bool = False


@dataclass(frozen=True)
class MethodEntry:
    """Everything the system knows of one method without importing its implementation."""

    name: str
    params: type[MethodParamsBase]
    dataset_kind: str
    min_images: int
    summary: str
    implementation: str  # "module:Class" of its core.methods.base.Method, imported by get_method
    memory: MemoryTerms
    exports: tuple[ExportFormat, ...] = ()
    primary_aliases: tuple[str, ...] = ()  # `?format=` names that mean the primary files themselves
    generation: GenerationUse | None = None  # None: its artifacts are not used by generations

    def export(self, format: str) -> ExportFormat:
        for offered in self.exports:
            if offered.name == format:
                return offered
        raise KeyError(f"a {self.name} artifact has no {format!r} export")


# Fitted by bench/fit_memory.py on 42 real steps (bench/realsize.py, CPU, bf16 autocast: SD1.5 at
# 128/256/512 px, SDXL at 128/256/512 px, every method, with and without checkpointing); the adapters
# share one fit, DreamBooth and ControlNet are one factor on it (see that script's docstring).
ADAPTER_FIT = ActivationFit(
    plain=Coefficients(resnet=4.278, transformer=59.693, text=0.0),
    checkpointed=Coefficients(resnet=5.304, transformer=0.0, text=0.0),
)

_ENTRIES = (
    MethodEntry(
        name="lora",
        params=LoraParams,
        dataset_kind="captioned_images",
        min_images=1,
        summary="Low-rank adapters on the UNet (and text encoder)",
        implementation="core.methods.lora:LoraMethod",
        memory=MemoryTerms(trained="lora_layers", activations=ADAPTER_FIT),
        exports=(
            ExportFormat(
                "kohya",
                "kohya/A1111/ComfyUI LoRA .safetensors (lora_unet_*, lora_te*_*, alpha, ss_* metadata)",
                "core.exports.lora:export_kohya",
                aliases=("a1111", "comfyui"),
            ),
        ),
        # After dreambooth: its layers land on a DreamBooth UNet rather than on the base's.
        generation=GenerationUse(field="loras", order=30, weight="scale"),
    ),
    MethodEntry(
        name="dreambooth",
        params=DreamBoothParams,
        dataset_kind="instance_images",
        min_images=3,
        summary="Full UNet fine-tune on a subject, with prior preservation from generated class images",
        implementation="core.methods.dreambooth:DreamBoothMethod",
        memory=MemoryTerms(
            trained="full_unet",
            activations=ActivationFit(
                plain=Coefficients(resnet=4.943, transformer=68.977, text=0.0),
                checkpointed=Coefficients(resnet=5.25, transformer=0.0, text=0.0),
            ),
        ),
        exports=(
            ExportFormat(
                "single_file",
                "single-file checkpoint in the original Stable Diffusion key layout",
                "core.exports.dreambooth:export_single_file",
                aliases=("a1111", "comfyui"),
            ),
        ),
        # First: it swaps whole modules, which everything after it then changes.
        generation=GenerationUse(field="dreambooth", order=10),
    ),
    MethodEntry(
        name="textual_inversion",
        params=TextualInversionParams,
        dataset_kind="images",
        min_images=1,
        summary="A new token's embedding, learnt from images and prompt templates",
        implementation="core.methods.textual_inversion:TextualInversionMethod",
        memory=MemoryTerms(
            trained="token_embeddings",
            activations=ActivationFit(
                plain=Coefficients(resnet=8.946, transformer=39.071, text=28.364),
                checkpointed=Coefficients(resnet=5.097, transformer=0.0, text=2.127),
            ),
            text_encoder_grads=True,
        ),
        exports=(
            ExportFormat(
                "a1111",
                "A1111/ComfyUI embedding .safetensors (emb_params, or clip_l + clip_g)",
                "core.exports.textual_inversion:export_a1111",
                aliases=("kohya", "comfyui"),
            ),
        ),
        # After a DreamBooth text encoder is in place, before LoRA wraps the encoder's layers.
        generation=GenerationUse(field="textual_inversions", order=20),
    ),
    MethodEntry(
        name="hypernetwork",
        params=HypernetworkParams,
        dataset_kind="captioned_images",
        min_images=1,
        summary="AUTOMATIC1111-style MLPs on the cross-attention context",
        implementation="core.methods.hypernetwork:HypernetworkMethod",
        memory=MemoryTerms(trained="context_mlps", activations=ADAPTER_FIT),
        exports=(
            ExportFormat(
                "a1111",
                "A1111 hypernetwork .pt (plain types only: torch.load(weights_only=True))",
                "core.exports.hypernetwork:export_a1111",
                aliases=("comfyui",),
            ),
        ),
        # After ip_adapter: load_ip_adapter replaces every attention processor, while the
        # hypernetwork wraps whatever processor it finds (so it also transforms IP attention's text part).
        generation=GenerationUse(field="hypernetwork", order=50, weight="strength"),
    ),
    MethodEntry(
        name="controlnet",
        params=ControlNetParams,
        dataset_kind="conditioned_images",
        min_images=1,
        summary="A ControlNet: images, conditioning images (or computed edges) and captions",
        implementation="core.methods.controlnet:ControlNetMethod",
        memory=MemoryTerms(
            trained="controlnet_copy",
            activations=ActivationFit(
                plain=Coefficients(resnet=3.529, transformer=49.248, text=0.0),
                checkpointed=Coefficients(resnet=5.978, transformer=0.0, text=0.0),
            ),
            unet_copy=True,
        ),
        exports=(
            ExportFormat(
                "single_file",
                "one ControlNet .safetensors for ComfyUI/Forge/A1111 models folders",
                "core.exports.controlnet:export_single_file",
                aliases=("a1111", "comfyui"),
            ),
        ),
        # Last: the ControlNet pipeline is built over the components as the others left them.
        generation=GenerationUse(field="controlnet", order=60, weight="scale", image=True),
    ),
    MethodEntry(
        name="ip_adapter",
        params=IPAdapterParams,
        dataset_kind="captioned_images",
        min_images=1,
        summary="An IP-Adapter: generation guided by a reference image",
        implementation="core.methods.ip_adapter:IPAdapterMethod",
        memory=MemoryTerms(trained="ip_attention", activations=ADAPTER_FIT, image_encoder=True),
        exports=(
            ExportFormat(
                "bin",
                "IP-Adapter .bin {'image_proj': ..., 'ip_adapter': ...}",
                "core.exports.ip_adapter:export_bin",
            ),
        ),
        # The primary ip_adapter.safetensors is already what ComfyUI and diffusers load.
        primary_aliases=("safetensors", "comfyui"),
        generation=GenerationUse(
            field="ip_adapter", order=40, weight="scale", image=True, image_encoder=True
        ),
    ),
    MethodEntry(
        name="hyper_lora",
        params=HyperLoraParams,
        dataset_kind="concept_images",
        min_images=MIN_CONCEPTS * MIN_IMAGES_PER_CONCEPT,
        summary="Predicts a LoRA from 1-5 reference images (lora jobs start from it via init_from)",
        implementation="core.methods.hyper_lora:HyperLoraMethod",
        # Not measured: it trains an adapter network over a frozen UNet as lora does.
        memory=MemoryTerms(trained="lora_predictor", activations=ADAPTER_FIT, image_encoder=True),
        # Generations use the LoRA it predicts (an ordinary lora artifact), never the network.
    ),
)

CATALOGUE: dict[str, MethodEntry] = {entry.name: entry for entry in _ENTRIES}
METHOD_NAMES: tuple[str, ...] = tuple(CATALOGUE)
# Built from the catalogue: pydantic needs the union at run time, and a hand-written copy could drift.
MethodName = Literal[*METHOD_NAMES]
MethodParams = Annotated[
    Union[tuple(entry.params for entry in _ENTRIES)],  # noqa: UP007
    Field(discriminator="method"),
]
# How generation requests use each method's artifacts, in the order they are applied.
GENERATION_USES: dict[str, GenerationUse] = {
    entry.name: entry.generation
    for entry in sorted(_ENTRIES, key=lambda entry: entry.generation.order if entry.generation else 0)
    if entry.generation is not None
}
APPLY_ORDER: tuple[str, ...] = tuple(GENERATION_USES)
