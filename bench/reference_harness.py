"""What every reference loop (bench/reference_loops.py) shares: its settings, the per-step
pieces the diffusers example scripts have in common, and the timed optimizer loop.

Common to all loops, as in the scripts: the VAE encodes every batch; noise from `randn_like`;
timesteps drawn uniformly on the device; no noise offset, no min-SNR weighting, no EMA; the loss is
`mse_loss(pred.float(), target.float())`; AdamW with torch's defaults (betas (0.9, 0.999), eps 1e-8,
weight decay 1e-2, the scripts' values) in torch's default implementation (foreach on CUDA, the
per-tensor loop on the CPU); a constant LR schedule; a GradScaler only under fp16; diffusers' default
attention (SDPA); the step loss read with `.item()` for the progress bar after every step.

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

from core.training.caching import encode_text
from core.training.optim import Precision


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
            sync(device)
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
    sync(device)
    return settings.steps * settings.batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())
