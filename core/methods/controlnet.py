"""ControlNet: a trainable copy of the base UNet's encoder that reads a conditioning image (edges, a
mask, a pose...) and adds its features to the frozen UNet's skip connections.

`ControlNetModel.from_unet` copies the encoder and mid block and creates the zero-initialised output
convolutions, so step 0 reproduces the base exactly and training only ever adds control. The
conditioning image enters at pixel size; its small embedding network must downsample by exactly the
VAE's factor to meet the latents, so `conditioning_embedding_out_channels` has one entry per halving
plus one. The artifact is `controlnet/` as `save_pretrained` writes it (`config.json` and
`diffusion_pytorch_model.safetensors`), which `ControlNetModel.from_pretrained` and ComfyUI load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from core.datasets.conditioning import canny
from core.errors import MethodInputError
from core.methods.base import SAMPLE_STEPS, Trainable
from core.methods.context import ArtifactUse, ControlNetUse, GenerationContext
from core.spec.methods import ControlNetParams
from core.spec.training import TrainingParams
from core.training.caching import Batch, CaptionedImage, TrainingItem, TrainingSet

if TYPE_CHECKING:
    from core.training.progress import TrainingHooks

FOLDER = "controlnet"
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default, for a factor-8 VAE
ASPECT_TOLERANCE = 0.02  # a conditioning image this close to its image's aspect is just resized


def vae_factor(base: Any) -> int:
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def embedding_channels(params: ControlNetParams, factor: int) -> tuple[int, ...]:
    """The conditioning embedding's channels: n entries downsample by 2^(n-1), which must be the
    VAE's factor or the embedding would not line up with the latents."""
    needed = int(math.log2(factor)) + 1
    chosen = params.conditioning_embedding_out_channels
    if chosen is None and needed <= len(DEFAULT_EMBEDDING_CHANNELS):
        return DEFAULT_EMBEDDING_CHANNELS[:needed]
    if chosen is None or len(chosen) != needed:
        got = "none" if chosen is None else f"{len(chosen)}: {list(chosen)}"
        raise MethodInputError(
            "conditioning_embedding_mismatch",
            f"conditioning_embedding_out_channels needs {needed} entries for this base (its VAE "
            f"downsamples {factor}x); got {got}",
        )
    return tuple(chosen)


def _named(items: list[CaptionedImage], indices: list[int]) -> str:
    names = [getattr(items[i], "name", None) or f"#{i}" for i in indices]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _edges_at_training_scale(image: Image.Image, resolution: int, low: int, high: int) -> Image.Image:
    """Canny edges as they look at the training size, returned at the image's size. Edges found at
    full size would be one pixel wide there and fade to grey once the cache shrinks the image."""
    scale = resolution / math.sqrt(image.width * image.height)
    if scale >= 1.0:
        return canny(image, low, high)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return canny(small, low, high).resize(image.size, Image.Resampling.NEAREST)


class ControlNetTrainable(Trainable):
    def __init__(
        self, base: Any, params: ControlNetParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        from diffusers import ControlNetModel

        super().__init__(base, training, device=device)
        self.params = params
        channels = embedding_channels(params, vae_factor(base))
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels)
        self.controlnet = controlnet.to(device).requires_grad_(True)
        if training.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        # The first training conditioning image: samples during training show the control at work.
        self.sample_image: Image.Image | None = None

    def training_items(
        self, items: list[CaptionedImage], *, resolution: int, hooks: TrainingHooks
    ) -> TrainingSet:
        images = [item.image.convert("RGB") for item in items]
        if self.params.conditioning == "canny":
            low, high = self.params.canny_low_threshold, self.params.canny_high_threshold
            conditions = [_edges_at_training_scale(image, resolution, low, high) for image in images]
        else:
            conditions = [getattr(item, "conditioning", None) for item in items]
            missing = [i for i, c in enumerate(conditions) if c is None]
            if missing:
                raise MethodInputError(
                    "missing_conditioning",
                    f"{len(missing)} image(s) have no conditioning image ({_named(items, missing)}); "
                    'upload conditioning/ images with the same names, or ask for conditioning "canny"',
                )
            conditions = [self._fitted(c, image) for c, image in zip(conditions, images, strict=True)]
        mismatched = [i for i, c in enumerate(conditions) if c is None]
        if mismatched:
            raise MethodInputError(
                "conditioning_aspect_mismatch",
                f"conditioning images must have their image's aspect ratio ({_named(items, mismatched)})",
            )
        self.sample_image = conditions[0]
        return TrainingSet(
            [
                TrainingItem(image, (item.caption or "",), condition)
                for item, image, condition in zip(items, images, conditions, strict=True)
            ]
        )

    @staticmethod
    def _fitted(condition: Image.Image, image: Image.Image) -> Image.Image | None:
        """The conditioning image at its image's size, so both take the same crop; None when the
        aspect differs (stretching would move the control away from what it describes)."""
        condition = condition.convert("RGB")
        if condition.size == image.size:
            return condition
        if abs(condition.width * image.height / (condition.height * image.width) - 1) > ASPECT_TOLERANCE:
            return None
        return condition.resize(image.size, Image.Resampling.BILINEAR)

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.conditioning is None:
            raise ValueError("a ControlNet batch needs its conditioning images")
        hidden, added = self._prompt(batch)
        noisy = self.objective.add_noise(batch.latents, batch.noise, batch.timesteps)
        down, mid = self.controlnet(
            noisy,
            batch.timesteps,
            encoder_hidden_states=hidden,
            controlnet_cond=batch.conditioning.to(self.controlnet.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )
        unet = self.base.unet
        prediction = unet(
            noisy,
            batch.timesteps,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            down_block_additional_residuals=[r.to(unet.dtype) for r in down],
            mid_block_additional_residual=mid.to(unet.dtype),
        ).sample
        return self.objective.loss(prediction, batch.latents, batch.noise, batch.timesteps)

    def _prompt(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The batch's prompt conditioning, with the empty prompt for a `proportion_empty_prompts`
        share of the samples: the ControlNet then also learns to steer from the image alone."""
        hidden, added = self.conditioning(batch)
        share = self.params.proportion_empty_prompts
        if share <= 0:
            return hidden, added
        if batch.drop is None or batch.uncond_hidden_states is None:
            raise ValueError("proportion_empty_prompts needs the batch's drop draws and empty prompt")
        dropped = batch.drop < share
        hidden = torch.where(dropped[:, None, None], batch.uncond_hidden_states.to(hidden.dtype), hidden)
        if added is not None:
            pooled = batch.uncond_pooled_embeds.to(added["text_embeds"].dtype)
            added = {**added, "text_embeds": torch.where(dropped[:, None], pooled, added["text_embeds"])}
        return hidden, added

    def save(self, out_dir: Path) -> list[str]:
        folder = out_dir / FOLDER
        self.controlnet.save_pretrained(folder, safe_serialization=True)
        return sorted(p.relative_to(out_dir).as_posix() for p in folder.rglob("*") if p.is_file())

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, size: int) -> list[Any]:
        if self.sample_image is None:
            return super().sample(prompts, seed=seed, size=size)
        ctx = GenerationContext(pipe=self.pipeline(), base_path=Path(self.base.path))
        ctx.controlnets.append(ControlNetUse(self.controlnet, self.sample_image, 1.0))
        generator = torch.Generator(self.base.unet.device).manual_seed(seed)
        return ctx.pipeline()(
            prompts,
            num_inference_steps=SAMPLE_STEPS,
            generator=generator,
            height=size,
            width=size,
            **ctx.controlnet_kwargs(),
        ).images


class ControlNetMethod:
    name: ClassVar[str] = "controlnet"
    Params: ClassVar[type[ControlNetParams]] = ControlNetParams
    dataset_kind: ClassVar[str] = "conditioned_images"
    artifact_format: ClassVar[str] = "diffusers"

    def build(
        self, base: Any, params: ControlNetParams, training: TrainingParams, *, device: torch.device
    ) -> ControlNetTrainable:
        return ControlNetTrainable(base, params, training, device=device)

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        """Add the ControlNet to the request; `ctx.pipeline()` builds the ControlNet pipeline over the
        cached pipeline's components, which stay untouched, so there is nothing to undo."""
        from diffusers import ControlNetModel

        if use.image is None:
            raise ValueError("a ControlNet needs its conditioning image")
        unet = ctx.pipe.unet
        model = ControlNetModel.from_pretrained(artifact_dir / FOLDER, torch_dtype=unet.dtype)
        ctx.controlnets.append(ControlNetUse(model.to(unet.device), use.image, use.scale))
