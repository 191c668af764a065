"""One training loop per method, written to what the diffusers example scripts do (facts, not code).

Each loop does, per step, what its script does with default arguments, and applies mixed precision as
accelerate does: only a module the script hands to `accelerator.prepare` (the one that trains) runs
under autocast, with its floating outputs returned in fp32; frozen modules run without autocast in
the training dtype (`weight_dtype`). On the CPU the bench trains in fp32, where these rules change
nothing.

Common to all loops, as in the scripts: the VAE encodes every batch; noise from `randn_like`;
timesteps drawn uniformly on the device; no noise offset, no min-SNR weighting, no EMA; the loss is
`mse_loss(pred.float(), target.float())`; AdamW with torch's defaults (betas (0.9, 0.999), eps 1e-8,
weight decay 1e-2, the scripts' values) in torch's default implementation (foreach on CUDA, the
per-tensor loop on the CPU); a constant LR schedule; a GradScaler only under fp16; diffusers' default
attention (SDPA); the step loss read with `.item()` for the progress bar after every step.

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

Differences common to all, deliberate: data loading is the same for both sides. Images are decoded,
resized, cropped and normalised, and captions tokenized, once up front; a step picks random rows (the
shuffled loader) and copies them to the device. This favours the reference: the scripts run the
torchvision transforms and tokenizers per item in the loader (in the main process by default), and
train_controlnet_sdxl.py's collate rebuilds its precomputed embeddings from Python lists. Left out as
host-side bookkeeping of microseconds: tqdm, `accelerator.log`, the no-op `accelerate` contexts and
`gather` of one process. Validation and checkpoints (every 500 steps by default) are off on both
sides: the timed windows are far shorter. DreamBooth's class images are made up front for both sides.
LRs are those of the scripts' README commands; speed does not depend on them.

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
    """The per-step pieces the examples share: prepared forwards, encoding, noise, target."""

    base: Any
    device: torch.device
    precision: Precision
    settings: Settings
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.settings.seed)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.precision.weight_dtype

    @property
    def sdxl(self) -> bool:
        return self.base.text_encoder_2 is not None

    def trained(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A forward through a module the script passes to `accelerator.prepare`: accelerate runs it
        under autocast and converts its fp16/bf16 outputs to fp32."""
        dtype = self.precision.autocast_dtype
        if dtype is None:
            return module(*args, **kwargs)
        from accelerate.utils import convert_to_fp32

        with torch.autocast(self.device.type, dtype=dtype):
            output = module(*args, **kwargs)
        return convert_to_fp32(output)

    def pick(self, count: int) -> torch.Tensor:
        """A shuffled loader's batch: `batch_size` random rows of `count`."""
        return torch.randint(0, count, (self.settings.batch_size,), generator=self.generator)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoded in the VAE's dtype (fp32 in the SDXL scripts), returned in the training dtype."""
        vae = self.base.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.sample()
        return (latents * vae.config.scaling_factor).to(self.weight_dtype)

    def encode(
        self, ids: torch.Tensor, ids_2: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frozen text encoders, now: (hidden states, SDXL pooled embedding or None)."""
        return encode_text(self.base, ids.to(self.device), None if ids_2 is None else ids_2.to(self.device))

    def noised(
        self, latents: torch.Tensor, *, fp32: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target) for the scheduler's prediction type; `fp32` adds the
        noise in fp32 and casts back, as train_controlnet.py does."""
        scheduler = self.base.noise_scheduler
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(latents),), device=self.device
        ).long()
        if fp32:
            noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(latents.dtype)
        else:
            noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            return noisy, timesteps, noise
        return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)

    def host_time_ids(self, count: int) -> torch.Tensor:
        """SDXL time ids as the LoRA and DreamBooth-LoRA SDXL scripts make them: a tensor per sample
        built on the host and copied to the device."""
        size = self.settings.resolution
        rows = [torch.tensor([[size, size, 0, 0, size, size]]) for _ in range(count)]
        return torch.cat([row.to(self.device, self.weight_dtype) for row in rows])

    def synced_time_ids(self, count: int) -> torch.Tensor:
        """As textual_inversion_sdxl.py: every original size and crop read back with `.item()` from
        the collated batch the loader put on the device, then one tensor copied back."""
        size = self.settings.resolution
        sizes = torch.full((2, count), size).to(self.device)
        crops = torch.zeros((2, count), dtype=torch.long).to(self.device)
        rows = [
            (sizes[0][i].item(), sizes[1][i].item(), crops[0][i].item(), crops[1][i].item(), size, size)
            for i in range(count)
        ]
        return torch.cat([torch.tensor(row) for row in rows]).to(self.device, self.weight_dtype)

    def place(self, names: tuple[str, ...], dtype: torch.dtype, *, trains: bool = False) -> None:
        for name in names:
            module = getattr(self.base, name)
            if module is not None:
                module.requires_grad_(trains).to(self.device, dtype)

    def vae_dtype(self) -> torch.dtype:
        """The SDXL LoRA, DreamBooth-LoRA and ControlNet scripts keep the VAE in fp32 (no fixed VAE
        given); the SD scripts cast it to the training dtype."""
        return torch.float32 if self.sdxl else self.weight_dtype


@dataclass
class Loop:
    """A method's reference: how one step's loss is made, and how its optimizer step goes."""

    step_loss: Callable[[], torch.Tensor]
    params: list[torch.nn.Parameter]
    clip: bool = True
    set_to_none: bool = True
    after_step: Callable[[], None] | None = None
    lr: float = 1e-4
    read_loss_before_backward: bool = False  # the LoRA scripts log `avg_loss.item()` mid-step


def run(loop: Loop, ctx: Context) -> float:
    """Warm-up then timed steps; images/s over the timed ones."""
    from diffusers.optimization import get_scheduler

    settings, device = ctx.settings, ctx.device
    optimizer = torch.optim.AdamW(loop.params, lr=loop.lr)  # torch's default implementation, as the examples
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.precision.grad_scaler)  # accelerate's, for fp16
    start = time.perf_counter()
    for step in range(settings.warmup + settings.steps):
        if step == settings.warmup:
            _sync(device)
            start = time.perf_counter()
        loss = loop.step_loss()
        if loop.read_loss_before_backward:
            loss.repeat(settings.batch_size).mean().item()
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


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())


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
        return _mse(ctx.trained(base.unet, *args, added_cond_kwargs=added, return_dict=False)[0], target)

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
        loss = _mse(pred_instance, target_instance)
        return loss + PRIOR_LOSS_WEIGHT * _mse(pred_prior, target_prior)

    return Loop(step_loss, list(base.unet.parameters()), set_to_none=False, lr=5e-6)


def textual_inversion(ctx: Context, items: list[Item], class_items: list[Item]) -> Loop:
    base, settings = ctx.base, ctx.settings
    ctx.place(("vae", "unet"), ctx.weight_dtype)
    ctx.place(("text_encoder",), torch.float32)
    # textual_inversion_sdxl.py prepares encoder 2, then casts it (embedding included) to the
    # training dtype; under fp16 that embedding could not train (GradScaler refuses fp16 gradients).
    ctx.place(("text_encoder_2",), torch.float32 if ctx.precision.grad_scaler else ctx.weight_dtype)
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
        if settings.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        embeddings.append(weight)
        originals.append(weight.detach().clone())
        placeholder_ids.append(token_id)
        sizes.append(len(tokenizer))
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
        return _mse(base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample, target)

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
        return _mse(prediction, target)

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
