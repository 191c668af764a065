"""Brief, deterministic pre-training of the tiny bases on the synthetic world (core/bases/tiny/world.py).

A random VAE decodes every latent to grey and a random UNet ignores its prompt, so tests on either
would test nothing. The recipe here is the cheapest found that gives (measured on 2 CPU cores):
a VAE that reconstructs any colour, and a text-conditioned UNet whose samples follow the colours
in the prompt. Every random draw comes from a seeded generator, so a build is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from core.bases.tiny import world
from core.bases.tiny.components import IMAGE_SIZE

VAE_STEPS = 400
VAE_CROP = 16  # the VAE is fully convolutional: 16 px crops train it at a quarter of the cost...
VAE_FULL_SIZE_FRACTION = 0.2  # ...and a last stretch at full size removes the crop-to-full gap
VAE_BATCH = 32
VAE_LR = 1e-3  # 2e-3 and up reached a worse VAE on some seeds
KL_WEIGHT = 1e-3  # small: enough to keep latents bounded, not enough to blur colours

# 550 steps passed the base tests on earlier machines but, on an AMD EPYC one, built a UNet that
# hardly read its prompt ("a solid blue image" came out (136, 33, 91)): the recipe was on an edge
# that float rounding decides. 900 gave (11, 52, 242) there, for about 70 s more per build.
UNET_STEPS = 900
UNET_BATCH = 32
UNET_LR = 3e-3
CAPTION_DROPOUT = 0.1  # so classifier-free guidance has an unconditional model to push against
UNRELATED_FRACTION = 0.1  # captions swapped for world.unrelated_captions
WORLD_IMAGES = 2048


def lr_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # Short warm-up, then cosine down to a tenth: a short run ends on a settled model.
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _residuals_start_as_identity(model: torch.nn.Module) -> None:
    # Zeroing each resnet's last conv makes the untrained VAE a shallow conv path; it reached a
    # given colour error in half the steps of the default init.
    for name, module in model.named_modules():
        if name.endswith("conv2") and isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def train_vae(vae: AutoencoderKL, *, seed: int, on_step: Callable[[int], None] | None = None) -> None:
    images = world.any_colour_batch(WORLD_IMAGES, IMAGE_SIZE, seed)
    generator = torch.Generator().manual_seed(seed)
    _residuals_start_as_identity(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    schedule = lr_schedule(optimizer, VAE_STEPS)
    vae.train()
    for step in range(VAE_STEPS):
        full_size = step >= VAE_STEPS * (1 - VAE_FULL_SIZE_FRACTION)
        crop = IMAGE_SIZE if full_size else VAE_CROP
        count = VAE_BATCH * VAE_CROP**2 // IMAGE_SIZE**2 if full_size else VAE_BATCH  # same pixels
        batch = images[torch.randint(len(images), (count,), generator=generator)]
        top, left = torch.randint(IMAGE_SIZE - crop + 1, (2,), generator=generator).tolist()
        batch = batch[:, :, top : top + crop, left : left + crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss = (reconstruction - batch).pow(2).mean() + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1)
    vae.eval()


@torch.no_grad()
def world_latents(vae: AutoencoderKL, *, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Unscaled latent means of the palette world, and their captions."""
    images, captions = world.make_batch(WORLD_IMAGES, IMAGE_SIZE, seed)
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    return latents, captions


@dataclass
class TextSide:
    """The text encoder(s) the UNet is trained with, and how the pipeline reads them."""

    tokenizers: list[CLIPTokenizer]
    encoders: list[torch.nn.Module]
    # (ids per tokenizer, dropped mask) -> (hidden states, pooled or None), as the pipeline builds them
    encode: Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning, constant: no crops, native size

    def token_ids(self, captions: list[str]) -> list[torch.Tensor]:
        return [
            t(
                captions,
                padding="max_length",
                max_length=t.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for t in self.tokenizers
        ]


def sd_text(tokenizer: CLIPTokenizer, encoder: torch.nn.Module) -> TextSide:
    def encode(ids: list[torch.Tensor], dropped: torch.Tensor) -> tuple[torch.Tensor, None]:
        # SD pipelines encode the empty negative prompt; dropped captions are already "" (index 0).
        return encoder(ids[0])[0], None

    return TextSide([tokenizer], [encoder], encode)


def sdxl_text(tokenizers: list[CLIPTokenizer], encoders: list[torch.nn.Module]) -> TextSide:
    def encode(ids: list[torch.Tensor], dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
        second = encoders[1](ids[1], output_hidden_states=True)
        hidden = torch.cat([first, second.hidden_states[-2]], dim=-1)
        keep = (~dropped).float()
        # SDXL pipelines default to all-zero embeddings for an empty negative prompt.
        return hidden * keep[:, None, None], second[0] * keep[:, None]

    size = float(IMAGE_SIZE)
    time_ids = torch.tensor([size, size, 0.0, 0.0, size, size])
    return TextSide(tokenizers, encoders, encode, time_ids)


def train_unet(
    unet: UNet2DConditionModel,
    text: TextSide,
    latents: torch.Tensor,
    captions: list[str],
    noise_scheduler: DDPMScheduler,
    *,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Text encoders and UNet together (the text encoders start random, so they must learn to
    tell colour words apart). Returns the final smoothed loss; `on_step(n)` after step n."""
    known = sorted(set(captions))
    unrelated = world.unrelated_captions(64, seed)
    ids = text.token_ids(["", *known, *unrelated])
    caption_index = torch.tensor([1 + known.index(c) for c in captions])
    params = [p for m in (unet, *text.encoders) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=0.0)
    schedule = lr_schedule(optimizer, UNET_STEPS)
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, *text.encoders):
        module.train()
    smoothed = 0.0
    for step in range(UNET_STEPS):
        pick = torch.randint(len(latents), (UNET_BATCH,), generator=generator)
        draw = torch.rand(UNET_BATCH, generator=generator)
        dropped = draw < CAPTION_DROPOUT
        swapped = (draw >= CAPTION_DROPOUT) & (draw < CAPTION_DROPOUT + UNRELATED_FRACTION)
        other = 1 + len(known) + torch.randint(len(unrelated), (UNET_BATCH,), generator=generator)
        chosen = torch.where(dropped, 0, torch.where(swapped, other, caption_index[pick]))
        hidden, pooled = text.encode([i[chosen] for i in ids], dropped)
        clean = latents[pick]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=generator)
        extra = None
        if pooled is not None and text.time_ids is not None:
            extra = {"text_embeds": pooled, "time_ids": text.time_ids.expand(UNET_BATCH, -1)}
        prediction = unet(
            noise_scheduler.add_noise(clean, noise, t), t, hidden, added_cond_kwargs=extra
        ).sample
        loss = (prediction - noise_scheduler.get_velocity(clean, noise, t)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if step == 0 else 0.95 * smoothed + 0.05 * loss.item()
        if on_step is not None:
            on_step(step + 1)
    for module in (unet, *text.encoders):
        module.eval()
    return smoothed
