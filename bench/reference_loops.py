"""One training loop per method, written to what the diffusers example scripts do (facts, not code).

Each loop does, per step, what its script does with default arguments, and applies mixed precision as
accelerate does: only a module the script hands to `accelerator.prepare` (the one that trains) runs
under autocast, with its floating outputs returned in fp32; frozen modules run without autocast in
the training dtype (`weight_dtype`). On the CPU the bench trains in fp32, where these rules change
nothing.

What every loop shares, and the deliberate differences common to all, are in
bench/reference_harness.py.

Fidelity, per loop (scripts read in huggingface/diffusers/examples):

- lora: text_to_image/train_text_to_image_lora.py (SD), train_text_to_image_lora_sdxl.py (SDXL).
  Matches: `unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`; UNet, text encoders (and VAE on SD) in
  the training dtype; LoRA parameters upcast to fp32 only under fp16 (the scripts call
  `cast_training_params` for fp16 only, so under bf16 LoRA trains in bf16); text encoded every step;
  the loss read with `.item()` before backward (the logged `avg_loss`) and again after the step;
  clipping at 1.0; `zero_grad()` (set to none). SDXL: VAE in fp32 (no fixed VAE given), latents cast
  to the training dtype; time ids built per sample on the host and copied to the device every step.
- dreambooth: dreambooth/train_dreambooth.py (SD); on SDXL, the SDXL handling of
  train_dreambooth_lora_sdxl.py, as diffusers has no full-UNet SDXL DreamBooth script.
  Matches: the whole UNet trains with fp32 weights under autocast; VAE and text encoder in the
  training dtype; instance and class images in one batch, instance first (the collate function);
  loss = mse(instance) + prior_loss_weight * mse(class); clipping at 1.0;
  `zero_grad(set_to_none=False)` (`--set_grads_to_none` is off by default). SD: prompts encoded every
  step (`--pre_compute_text_embeddings` is off by default). SDXL: VAE in fp32; the instance and class
  prompts encoded and the time ids computed once before training, as that script does for fixed
  prompts and frozen encoders.
- textual_inversion: textual_inversion/textual_inversion.py, textual_inversion_sdxl.py.
  Matches: the token added, embeddings resized and initialised from the initializer token; the whole
  embedding matrix requires grad and AdamW updates all of it; after every step all rows but the
  placeholder's are restored from the saved copy through a CPU boolean mask built per step; no
  clipping; `zero_grad()` (set to none); the trained text encoder in fp32 under autocast, UNet and
  VAE in the training dtype without autocast, hidden states cast to the training dtype. SDXL: both
  encoders get the token; encoder 2 is prepared but then cast to the training dtype, its embedding
  included; time ids read back per sample with `.item()` from the batch on the device (four syncs
  per sample). Differs: under fp16 encoder 2 stays in fp32, because GradScaler refuses to unscale
  fp16 gradients (the script would stop there); the script's `save_steps` embedding saves (every
  500 steps) are left out with the checkpoints.
- controlnet: controlnet/train_controlnet.py (SD), train_controlnet_sdxl.py (SDXL).
  Matches: `ControlNetModel.from_unet`, all of it trained in fp32 under autocast; UNet, VAE and text
  encoder frozen in the training dtype; noise added in fp32 then cast
  (`add_noise(latents.float(), noise.float(), t).to(weight_dtype)`); the conditioning image in
  [0, 1] in the training dtype; the UNet runs without autocast on the residuals cast to the
  training dtype; clipping at 1.0; `zero_grad(set_to_none=False)`. SD: prompts encoded every step.
  SDXL: VAE in fp32; prompt embeddings and time ids computed once before training (the script's
  `dataset.map`) and copied to the device with each batch. Differs: the conditioning embedding's
  channels are cut to the tiny bases' VAE factor (diffusers' default on real bases), as Atelier does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.reference_harness import Context, Loop, Settings, mse, run
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
from core.training.caching import tokenize
from core.training.optim import resolve_precision

ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
PRIOR_LOSS_WEIGHT = 1.0


def lora(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    from peft import LoraConfig

    from core.methods.lora import unet_targets

    base, settings = ctx.base, ctx.settings
    ctx.place(("unet", "text_encoder", "text_encoder_2"), ctx.weight_dtype)
    ctx.place(("vae",), ctx.vae_dtype())
    base.unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.rank,
            init_lora_weights="gaussian",
            target_modules=unet_targets("attention"),
        )
    )
    params = [p for p in base.unet.parameters() if p.requires_grad]
    if ctx.precision.grad_scaler:  # cast_training_params, called for fp16 only
        for param in params:
            param.data = param.data.float()
    if settings.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    pixels = to_model_pixels([item.image for item in items], settings.resolution)
    ids, ids_2 = tokenize(base, [item.caption for item in items])

    def step_loss() -> torch.Tensor:
        index = ctx.pick(len(items))
        latents = ctx.latents(pixels[index])
        noisy, timesteps, target = ctx.noised(latents)
        added = {"time_ids": ctx.host_time_ids(len(index))} if ctx.sdxl else None
        hidden, pooled = ctx.encode(ids[index], None if ids_2 is None else ids_2[index])
        if added is not None:
            added["text_embeds"] = pooled
        args = (noisy, timesteps, hidden)
        return mse(ctx.trained(base.unet, *args, added_cond_kwargs=added, return_dict=False)[0], target)

    return Loop(step_loss, params, read_loss_before_backward=True)


def dreambooth(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    base, settings = ctx.base, ctx.settings
    ctx.place(("text_encoder", "text_encoder_2"), ctx.weight_dtype)
    ctx.place(("vae",), ctx.vae_dtype())
    ctx.place(("unet",), torch.float32, trains=True)  # fp32 weights, autocast does the rest
    if settings.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    size = settings.resolution
    instance = to_model_pixels([item.image for item in items], size)
    prior = to_model_pixels([item.image for item in class_items], size)
    ids, ids_2 = tokenize(base, [INSTANCE_PROMPT, CLASS_PROMPT])
    if ctx.sdxl:  # both prompts encoded once, as train_dreambooth_lora_sdxl.py does
        with torch.no_grad():
            fixed_hidden, fixed_pooled = ctx.encode(ids, ids_2)
        fixed_time_ids = ctx.host_time_ids(2)

    def step_loss() -> torch.Tensor:
        i, c = ctx.pick(len(instance)), ctx.pick(len(prior))
        n = len(i)
        # The collate function: instance examples first, then class examples, one batch.
        rows = torch.tensor([0] * n + [1] * n)
        latents = ctx.latents(torch.cat([instance[i], prior[c]]))
        noisy, timesteps, target = ctx.noised(latents)
        if ctx.sdxl:
            rows = rows.to(ctx.device)
            hidden = fixed_hidden[rows]
            added = {"time_ids": fixed_time_ids[rows], "text_embeds": fixed_pooled[rows]}
        else:
            hidden, added = ctx.encode(ids[rows], None)[0], None
        prediction = ctx.trained(
            base.unet, noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False
        )
        pred_instance, pred_prior = prediction[0].chunk(2)
        target_instance, target_prior = target.chunk(2)
        loss = mse(pred_instance, target_instance)
        return loss + PRIOR_LOSS_WEIGHT * mse(pred_prior, target_prior)

    return Loop(step_loss, list(base.unet.parameters()), set_to_none=False, lr=5e-6)


@dataclass
class _Placeholder:
    """The placeholder token in one text encoder: the embedding matrix that trains, and what to keep."""

    weight: torch.nn.Parameter
    original: torch.Tensor  # the matrix before training, to restore every other row from
    token_id: int
    size: int  # rows of the matrix (the tokenizer's length)


def _add_placeholder(ctx: Context) -> list[_Placeholder]:
    """The token added to every text encoder, initialised from the initializer token; the whole
    embedding matrix requires grad, the rest of the encoder stays frozen."""
    placeholders = []
    for tokenizer_name, encoder_name in ENCODERS:
        tokenizer, encoder = getattr(ctx.base, tokenizer_name), getattr(ctx.base, encoder_name)
        if encoder is None:
            continue
        tokenizer.add_tokens([PLACEHOLDER])
        token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        init_ids = tokenizer(INITIALIZER, add_special_tokens=False).input_ids
        encoder.resize_token_embeddings(len(tokenizer))
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[init_ids].mean(dim=0)
        weight.requires_grad_(True)
        encoder.train()
        if ctx.settings.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        placeholders.append(_Placeholder(weight, weight.detach().clone(), token_id, len(tokenizer)))
    return placeholders


def textual_inversion(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    base, settings = ctx.base, ctx.settings
    ctx.place(("vae", "unet"), ctx.weight_dtype)
    ctx.place(("text_encoder",), torch.float32)
    # textual_inversion_sdxl.py prepares encoder 2, then casts it (embedding included) to the
    # training dtype; under fp16 that embedding could not train (GradScaler refuses fp16 gradients).
    ctx.place(("text_encoder_2",), torch.float32 if ctx.precision.grad_scaler else ctx.weight_dtype)
    placeholders = _add_placeholder(ctx)
    if settings.gradient_checkpointing and not ctx.sdxl:  # the SDXL script checkpoints the encoders only
        base.unet.train()
        base.unet.enable_gradient_checkpointing()
    pixels = to_model_pixels([item.image for item in items], settings.resolution)
    ids, ids_2 = tokenize(base, [template.format(PLACEHOLDER) for template in TI_TEMPLATES])
    dtype = ctx.weight_dtype

    def prompt(template: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """The trained encoders' forwards (prepared), hidden states cast to the training dtype."""
        first = ids[template].to(ctx.device)
        if not ctx.sdxl:
            return ctx.trained(base.text_encoder, first)[0].to(dtype), None
        hidden_1 = ctx.trained(base.text_encoder, first, output_hidden_states=True).hidden_states[-2]
        output_2 = ctx.trained(base.text_encoder_2, ids_2[template].to(ctx.device), output_hidden_states=True)
        hidden = torch.cat([hidden_1.to(dtype), output_2.hidden_states[-2].to(dtype)], dim=-1)
        return hidden, {"text_embeds": output_2[0], "time_ids": ctx.synced_time_ids(len(template))}

    def step_loss() -> torch.Tensor:
        index, template = ctx.pick(len(items)), ctx.pick(len(TI_TEMPLATES))
        latents = ctx.latents(pixels[index])
        noisy, timesteps, target = ctx.noised(latents)
        hidden, added = prompt(template)
        return mse(base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample, target)

    @torch.no_grad()
    def restore() -> None:
        for placeholder in placeholders:
            keep = torch.ones((placeholder.size,), dtype=torch.bool)
            keep[placeholder.token_id] = False
            placeholder.weight[keep] = placeholder.original[keep]

    embeddings = [placeholder.weight for placeholder in placeholders]
    return Loop(step_loss, embeddings, clip=False, after_step=restore, lr=5e-4)


def controlnet(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    from diffusers import ControlNetModel

    base, settings = ctx.base, ctx.settings
    model = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=controlnet_channels(base)
    )
    model.to(ctx.device, torch.float32).requires_grad_(True).train()
    ctx.place(("unet", "text_encoder", "text_encoder_2"), ctx.weight_dtype)
    ctx.place(("vae",), ctx.vae_dtype())
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    size = settings.resolution
    pixels = to_model_pixels([item.image for item in items], size)
    control = to_unit_pixels([item.conditioning for item in items], size)
    ids, ids_2 = tokenize(base, [item.caption for item in items])
    unet, dtype = base.unet, ctx.weight_dtype
    if ctx.sdxl:  # train_controlnet_sdxl.py's dataset.map: embeddings and time ids before training
        with torch.no_grad():
            hidden_all, pooled_all = (t.cpu() for t in ctx.encode(ids, ids_2))
        time_ids_all = ctx.host_time_ids(len(items)).cpu()

    def conditioning(index: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        if not ctx.sdxl:
            return ctx.encode(ids[index], None)[0], None
        added = {"text_embeds": pooled_all[index], "time_ids": time_ids_all[index]}
        return hidden_all[index].to(ctx.device), {k: v.to(ctx.device) for k, v in added.items()}

    def step_loss() -> torch.Tensor:
        index = ctx.pick(len(items))
        latents = ctx.latents(pixels[index])
        noisy, timesteps, target = ctx.noised(latents, fp32=True)
        hidden, added = conditioning(index)
        down, mid = ctx.trained(
            model,
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
            return_dict=False,
        )[0]
        return mse(prediction, target)

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
