"""One training loop per method, written to what the diffusers example scripts do (facts, not code).

Common to all: the VAE encodes every batch and the text encoders encode every batch (there is no
cache), the optimizer is plain AdamW (torch's default foreach implementation), and the progress bar
reads `loss.item()` every step. Per method, what its example script does besides:

- lora (train_text_to_image_lora.py): LoRA on the UNet attention, frozen weights in the training
  dtype, the LoRA parameters upcast to fp32, gradients clipped.
- dreambooth (train_dreambooth.py): the whole UNet trains with fp32 master weights under autocast;
  instance and class images go through the UNet as one concatenated batch and the loss is
  mse(instance) + prior_loss_weight * mse(class); gradients clipped; `zero_grad(set_to_none=False)`
  (the script's `--set_grads_to_none` defaults to off).
- textual_inversion (textual_inversion.py): the new token is added and the embedding matrix resized;
  the whole matrix requires grad (nothing else does) and AdamW updates all of it; after each step
  every row but the placeholder's is restored from a saved copy (a boolean row mask built per step);
  no gradient clipping; the text encoder in fp32, UNet and VAE in the training dtype. SDXL: both
  encoders get the token, as Atelier trains both.
- controlnet (train_controlnet.py): `ControlNetModel.from_unet` in fp32, everything else frozen in the
  training dtype; the ControlNet's residuals feed the UNet; gradients clipped;
  `zero_grad(set_to_none=False)`.

Every loop returns images/s over the timed steps (instance images for DreamBooth, whose steps each
also train as many class images), after `warmup` untimed steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bench.workload import (
    CLASS_PROMPT,
    INITIALIZER,
    INSTANCE_PROMPT,
    PLACEHOLDER,
    TI_TEMPLATES,
    Item,
    controlnet_channels,
    to_model_pixels,
    to_unit_pixels,
)
from core.training.caching import encode_text, tokenize
from core.training.optim import Precision, resolve_precision

ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
PRIOR_LOSS_WEIGHT = 1.0


@dataclass
class Settings:
    """What every reference loop takes from the command line."""

    steps: int
    warmup: int
    batch_size: int
    resolution: int
    seed: int = 0
    rank: int = 4
    gradient_checkpointing: bool = False


@dataclass
class Context:
    """The per-step pieces every example shares: encode, noise, target."""

    base: Any
    device: torch.device
    precision: Precision
    settings: Settings
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        size = self.settings.resolution
        self.time_ids = torch.tensor(
            [[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.precision.weight_dtype

    def autocast(self) -> torch.autocast:
        dtype = self.precision.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def pick(self, count: int) -> torch.Tensor:
        """A shuffled loader's batch: `batch_size` random rows of `count`."""
        return torch.randint(0, count, (self.settings.batch_size,), generator=self.generator)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        pixels = pixels.to(self.device, self.weight_dtype)
        return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor

    def prompt(self, ids: torch.Tensor, ids_2: torch.Tensor | None) -> tuple[torch.Tensor, dict | None]:
        """(encoder hidden states, SDXL added_cond_kwargs or None), encoded now."""
        hidden, pooled = encode_text(
            self.base, ids.to(self.device), None if ids_2 is None else ids_2.to(self.device)
        )
        if pooled is None:
            return hidden, None
        return hidden, {"text_embeds": pooled, "time_ids": self.time_ids.repeat(len(ids), 1)}

    def noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target) for the scheduler's prediction type."""
        scheduler = self.base.noise_scheduler
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(latents),), device=self.device
        ).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            return noisy, timesteps, noise
        return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)

    def place(self, names: tuple[str, ...], dtype: torch.dtype, *, trains: bool = False) -> None:
        for name in names:
            module = getattr(self.base, name)
            if module is not None:
                module.requires_grad_(trains).to(self.device, dtype)


@dataclass
class Loop:
    """A method's reference: how one step's loss is made, and how its optimizer step goes."""

    step_loss: Callable[[], torch.Tensor]
    params: list[torch.nn.Parameter]
    clip: bool = True
    set_to_none: bool = True
    after_step: Callable[[], None] | None = None
    lr: float = 1e-4


def run(loop: Loop, ctx: Context) -> float:
    """Warm-up then timed steps; images/s over the timed ones."""
    from diffusers.optimization import get_scheduler

    settings, device = ctx.settings, ctx.device
    optimizer = torch.optim.AdamW(loop.params, lr=loop.lr)  # foreach: torch's default, as the examples
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.precision.grad_scaler)  # accelerate's, for fp16
    start = time.perf_counter()
    for step in range(settings.warmup + settings.steps):
        if step == settings.warmup:
            _sync(device)
            start = time.perf_counter()
        loss = loop.step_loss()
        scaler.scale(loss).backward()
        if loop.clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(loop.params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=loop.set_to_none)
        if loop.after_step is not None:
            loop.after_step()
        loss.item()  # the progress bar shows the step loss every step
    _sync(device)
    return settings.steps * settings.batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unet_loss(
    ctx: Context, pixels: torch.Tensor, ids: torch.Tensor, ids_2: torch.Tensor | None
) -> torch.Tensor:
    with ctx.autocast():
        latents = ctx.latents(pixels)
        hidden, added = ctx.prompt(ids, ids_2)
        noisy, timesteps, target = ctx.noised(latents)
        prediction = ctx.base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        return F.mse_loss(prediction.float(), target.float())


def lora(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    from peft import LoraConfig

    from core.methods.lora import unet_targets

    base, settings = ctx.base, ctx.settings
    ctx.place(("vae", "unet", "text_encoder", "text_encoder_2"), ctx.weight_dtype)
    base.unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.rank,
            init_lora_weights="gaussian",
            target_modules=unet_targets("attention"),
        )
    )
    params = [p for p in base.unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    if settings.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    pixels = to_model_pixels([item.image for item in items], settings.resolution)
    ids, ids_2 = tokenize(base, [item.caption for item in items])

    def step_loss() -> torch.Tensor:
        index = ctx.pick(len(items))
        return _unet_loss(ctx, pixels[index], ids[index], None if ids_2 is None else ids_2[index])

    return Loop(step_loss, params)


def dreambooth(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    base, settings = ctx.base, ctx.settings
    ctx.place(("vae", "text_encoder", "text_encoder_2"), ctx.weight_dtype)
    ctx.place(("unet",), torch.float32, trains=True)  # fp32 master weights, autocast does the rest
    if settings.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    size = settings.resolution
    instance = to_model_pixels([item.image for item in items], size)
    prior = to_model_pixels([item.image for item in class_items], size)
    ids, ids_2 = tokenize(base, [INSTANCE_PROMPT, CLASS_PROMPT])

    def step_loss() -> torch.Tensor:
        i, c = ctx.pick(len(instance)), ctx.pick(len(prior))
        n = len(i)
        # The collate function: instance examples first, then class examples, one batch.
        rows = torch.tensor([0] * n + [1] * n)
        with ctx.autocast():
            latents = ctx.latents(torch.cat([instance[i], prior[c]]))
            hidden, added = ctx.prompt(ids[rows], None if ids_2 is None else ids_2[rows])
            noisy, timesteps, target = ctx.noised(latents)
            prediction = base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
            pred_instance, pred_prior = prediction.float().chunk(2)
            target_instance, target_prior = target.float().chunk(2)
            loss = F.mse_loss(pred_instance, target_instance)
            return loss + PRIOR_LOSS_WEIGHT * F.mse_loss(pred_prior, target_prior)

    return Loop(step_loss, list(base.unet.parameters()), set_to_none=False, lr=5e-6)


def textual_inversion(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    base, settings = ctx.base, ctx.settings
    ctx.place(("vae", "unet"), ctx.weight_dtype)
    ctx.place(("text_encoder", "text_encoder_2"), torch.float32)
    embeddings, originals, placeholder_ids, sizes = [], [], [], []
    for tokenizer_name, encoder_name in ENCODERS:
        tokenizer, encoder = getattr(base, tokenizer_name), getattr(base, encoder_name)
        if encoder is None:
            continue
        tokenizer.add_tokens([PLACEHOLDER])
        token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        init_ids = tokenizer(INITIALIZER, add_special_tokens=False).input_ids
        encoder.resize_token_embeddings(len(tokenizer))
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[init_ids].mean(dim=0)
        weight.requires_grad_(True)  # the whole matrix; the rest of the encoder stays frozen
        encoder.train()
        embeddings.append(weight)
        originals.append(weight.detach().clone())
        placeholder_ids.append(token_id)
        sizes.append(len(tokenizer))
    pixels = to_model_pixels([item.image for item in items], settings.resolution)
    ids, ids_2 = tokenize(base, [template.format(PLACEHOLDER) for template in TI_TEMPLATES])

    def step_loss() -> torch.Tensor:
        index, template = ctx.pick(len(items)), ctx.pick(len(TI_TEMPLATES))
        return _unet_loss(ctx, pixels[index], ids[template], None if ids_2 is None else ids_2[template])

    @torch.no_grad()
    def restore() -> None:
        for weight, original, token_id, size in zip(
            embeddings, originals, placeholder_ids, sizes, strict=True
        ):
            keep = torch.ones((size,), dtype=torch.bool)
            keep[token_id] = False
            weight[keep] = original[keep]

    return Loop(step_loss, embeddings, clip=False, after_step=restore, lr=5e-4)


def controlnet(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    from diffusers import ControlNetModel

    base, settings = ctx.base, ctx.settings
    model = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=controlnet_channels(base)
    )
    model.to(ctx.device, torch.float32).requires_grad_(True).train()
    ctx.place(("vae", "unet", "text_encoder", "text_encoder_2"), ctx.weight_dtype)
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    size = settings.resolution
    pixels = to_model_pixels([item.image for item in items], size)
    control = to_unit_pixels([item.conditioning for item in items], size)
    ids, ids_2 = tokenize(base, [item.caption for item in items])
    unet, dtype = base.unet, ctx.weight_dtype

    def step_loss() -> torch.Tensor:
        index = ctx.pick(len(items))
        with ctx.autocast():
            latents = ctx.latents(pixels[index])
            hidden, added = ctx.prompt(ids[index], None if ids_2 is None else ids_2[index])
            noisy, timesteps, target = ctx.noised(latents)
            down, mid = model(
                noisy,
                timesteps,
                encoder_hidden_states=hidden,
                controlnet_cond=control[index].to(ctx.device, dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )
            prediction = unet(
                noisy,
                timesteps,
                encoder_hidden_states=hidden,
                added_cond_kwargs=added,
                down_block_additional_residuals=[sample.to(dtype) for sample in down],
                mid_block_additional_residual=mid.to(dtype),
            ).sample
            return F.mse_loss(prediction.float(), target.float())

    return Loop(step_loss, list(model.parameters()), set_to_none=False, lr=1e-5)


LOOPS: dict[str, Callable[[Context, list[Item], list[Item]], Loop]] = {
    "lora": lora,
    "dreambooth": dreambooth,
    "textual_inversion": textual_inversion,
    "controlnet": controlnet,
}


def reference_rate(
    method: str,
    base: Any,
    items: list[Item],
    class_items: list[Item],
    settings: Settings,
    device: torch.device,
) -> float:
    ctx = Context(base, device, resolve_precision("auto", device), settings)
    return run(LOOPS[method](ctx, items, class_items), ctx)
