"""What every method hands the one training loop, and what the catalogue (core/spec/catalogue.py)
expects of a method's implementation.

A method's `build` wraps the base models into a `Trainable`: it marks what trains (adapters, new
embeddings, whole modules) and leaves everything else frozen. The loop owns the optimizer, precision,
data, checkpoints and progress; the Trainable only turns a cached `Batch` into a loss and writes its
artifact files. The default `forward` is the denoising loss most methods share.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from core.errors import MethodInputError
from core.training.caching import Batch, CaptionedImage, TrainingItem, TrainingSet, encode_text
from core.training.objective import DiffusionObjective

if TYPE_CHECKING:
    from PIL import Image
    from pydantic import BaseModel

    from core.methods.context import ArtifactUse, GenerationContext
    from core.spec.training import TrainingParams
    from core.training.progress import TrainingHooks

SAMPLE_STEPS = 25


class Trainable(torch.nn.Module):
    """Modules registered as attributes follow train()/eval(); `base` is kept as a plain attribute."""

    # When True the loop keeps token ids instead of cached embeddings and `forward` encodes them.
    text_encoder_trains: bool = False

    def __init__(self, base: Any, training: TrainingParams, *, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.objective = DiffusionObjective(
            base.noise_scheduler, device=device, min_snr_gamma=training.min_snr_gamma
        )

    # --- the loop's view -------------------------------------------------------------------
    def training_items(
        self, items: list[CaptionedImage], *, resolution: int, hooks: TrainingHooks
    ) -> TrainingSet:
        """What the loop caches. Called once, after the models are on the training device and
        before any step. Default: each image with its caption ("" when it has none); conditioning
        images are left out (only ControlNet reads them, and a dataset may have them for some
        images only)."""
        return TrainingSet([TrainingItem(item.image, (item.caption or "",)) for item in items])

    def image_features(self, images: list[Image.Image]) -> torch.Tensor | None:
        """Per-image features cached with the latents (IP-Adapter: the frozen image encoder's
        embedding); `images` are the training crops. None: nothing to cache."""
        return None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = {name for name, p in own.items() if p.requires_grad}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in state.items():
            own[name].copy_(tensor)

    @torch.no_grad()
    def load_initial_state(self, state: dict[str, torch.Tensor]) -> None:
        """Start some trainable tensors from given values (the rest keep their own init)."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        wrong = [n for n, t in state.items() if n not in own or own[n].shape != t.shape]
        if wrong:
            raise MethodInputError(
                "init_mismatch",
                f"the initial weights do not fit this model ({len(wrong)} tensors, e.g. {wrong[0]})",
            )
        for name, tensor in state.items():
            own[name].copy_(tensor)

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden, added = self.conditioning(batch)
        noisy = self.objective.add_noise(batch.latents, batch.noise, batch.timesteps)
        prediction = self.base.unet(
            noisy, batch.timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added
        ).sample
        return self.objective.loss(prediction, batch.latents, batch.noise, batch.timesteps)

    def conditioning(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(encoder hidden states, SDXL added_cond_kwargs or None), cached or encoded now."""
        if batch.encoder_hidden_states is not None:
            hidden, pooled = batch.encoder_hidden_states, batch.pooled_embeds
        else:
            hidden, pooled = encode_text(self.base, batch.input_ids, batch.input_ids_2)
        if pooled is None:
            return hidden, None
        # time_ids stay fp32: crop offsets such as 598 are not exact in bf16.
        return hidden, {"text_embeds": pooled, "time_ids": batch.time_ids}

    def save(self, out_dir: Path) -> list[str]:
        """Write the artifact files (ecosystem names, safetensors); return their names."""
        raise NotImplementedError

    # --- samples during training ---------------------------------------------------------------
    def pipeline(self) -> Any:
        """A diffusers pipeline over the live modules, so samples show the model as it trains."""
        from diffusers import (
            DPMSolverMultistepScheduler,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )

        base = self.base
        scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
        common = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer}
        if base.text_encoder_2 is not None:
            return StableDiffusionXLPipeline(
                **common,
                text_encoder_2=base.text_encoder_2,
                tokenizer_2=base.tokenizer_2,
                unet=base.unet,
                scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            **common,
            unet=base.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, size: int) -> list[Any]:
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        device = self.base.unet.device
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(
            prompts, num_inference_steps=SAMPLE_STEPS, generator=generator, height=size, width=size
        ).images


class Method(Protocol):
    """One fine-tuning technique: how it trains (`build`) and how inference uses it (`apply`)."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    dataset_kind: ClassVar[str]
    artifact_format: ClassVar[str]

    def build(
        self, base: Any, params: Any, training: TrainingParams, *, device: torch.device
    ) -> Trainable: ...

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        """Change `ctx.pipe` (or add call kwargs / ControlNets) for one request, and push onto
        `ctx.undo` whatever puts the shared, cached pipeline back exactly as it was."""
        ...
