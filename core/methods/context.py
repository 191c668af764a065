"""What a method's `apply` works on: one generation request against a shared, cached pipeline.

Base pipelines are cached per worker process, so every change an artifact makes (adapters, tokens,
attention processors, a swapped UNet) must be undone after the request. Each `apply` pushes its own
undo; `applied` runs them last-first, also when generation fails, so nothing leaks into the next
request. Artifacts are applied in the catalogue's fixed order (core.spec.catalogue.APPLY_ORDER, each
entry says why it sits where it does) so that, for example, LoRA layers land on a DreamBooth UNet
rather than on the base's. The worker's own changes go the same way: a request's scheduler
(`use_scheduler`) and the cached CLIP image encoder it lends an IP-Adapter (`provide_image_encoder`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.spec.catalogue import APPLY_ORDER

log = logging.getLogger(__name__)

# Request scheduler name -> (diffusers class, settings over the base scheduler's config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler `name` over the base's config: same betas, prediction type and timestep
    spacing as the base was trained and shipped with, only the sampling rule differs."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


@dataclass
class ArtifactUse:
    """How one request uses one artifact."""

    adapter_name: str  # unique within the request, e.g. "a0"
    # LoRA scale, hypernetwork strength, ControlNet conditioning scale or IP-Adapter scale.
    scale: float = 1.0
    image: Any | None = None  # PIL RGB: ControlNet conditioning image, IP-Adapter reference image


@dataclass
class ControlNetUse:
    model: Any  # ControlNetModel on the pipeline's device and dtype
    image: Any  # PIL conditioning image
    scale: float


@dataclass
class GenerationContext:
    pipe: Any  # the cached base pipeline; whatever changes it must push an undo
    base_path: Path  # the base's local diffusers folder
    image_encoder_path: Path | None = None  # the frozen CLIP image encoder IP-Adapter uses, if any
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # merged into pipe(...)
    controlnets: list[ControlNetUse] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    dirty: bool = False  # an undo failed: the cached pipeline must not serve another request

    def use_scheduler(self, name: str) -> None:
        """This request samples with `name`: a fresh scheduler (no state shared with any other
        request) on the cached pipeline, whose own scheduler an undo puts back."""
        pipe, original = self.pipe, self.pipe.scheduler
        self.undo.append(lambda: setattr(pipe, "scheduler", original))
        pipe.scheduler = make_scheduler(name, original.config)

    def provide_image_encoder(self, encoder: Any) -> None:
        """Lend a loaded (worker-cached) CLIP image encoder to this request: an IP-Adapter `apply`
        then finds it on the pipeline instead of loading one from disk. Call before applying; the
        undo (run after the adapter's own) leaves the pipeline as it was."""
        pipe = self.pipe
        if getattr(pipe, "image_encoder", None) is not None:
            return
        self.undo.append(lambda: pipe.register_modules(image_encoder=None))
        pipe.register_modules(image_encoder=encoder)

    def pipeline(self) -> Any:
        """The pipeline to call: the base's, or its ControlNet variant over the same components."""
        if not self.controlnets:
            return self.pipe
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        models = [c.model for c in self.controlnets]
        controlnet = models[0] if len(models) == 1 else MultiControlNetModel(models)
        sdxl = getattr(self.pipe, "text_encoder_2", None) is not None
        cls = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
        init_names = _init_names(cls)
        components = {k: v for k, v in self.pipe.components.items() if k in init_names}
        # The base's config flags too (requires_safety_checker, force_zeros_for_empty_prompt): with
        # the class defaults the ControlNet pipeline would treat empty negative prompts differently.
        flags = {
            k: v
            for k, v in self.pipe.config.items()
            if k in init_names and k not in components and not k.startswith("_")
        }
        pipe = cls(**components, **flags, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def controlnet_kwargs(self) -> dict[str, Any]:
        if not self.controlnets:
            return {}
        single = len(self.controlnets) == 1
        images = [c.image for c in self.controlnets]
        scales = [c.scale for c in self.controlnets]
        return {
            "image": images[0] if single else images,
            "controlnet_conditioning_scale": scales[0] if single else scales,
        }


def _init_names(cls: Any) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@contextmanager
def applied(
    ctx: GenerationContext, uses: list[tuple[Any, Path, dict[str, Any], ArtifactUse]]
) -> Iterator[Any]:
    """Apply (method, artifact_dir, manifest, use) in APPLY_ORDER; yield the pipeline to call with
    `ctx.call_kwargs | ctx.controlnet_kwargs()`; undo everything afterwards."""
    ordered = sorted(uses, key=lambda u: APPLY_ORDER.index(u[0].name))
    try:
        for method, artifact_dir, manifest, use in ordered:
            method.apply(ctx, artifact_dir, manifest, use)
        yield ctx.pipeline()
    finally:
        undo_all(ctx)


def undo_all(ctx: GenerationContext) -> None:
    """Run every pushed undo, last first, even when one fails (then the context is marked dirty
    and the first failure raised: the caller must drop the pipeline)."""
    failed: Exception | None = None
    while ctx.undo:
        action = ctx.undo.pop()
        try:
            action()
        except Exception as exc:  # keep undoing the rest
            log.exception("undo after a generation failed")
            failed = failed or exc
    if failed is not None:
        ctx.dirty = True
        raise failed
