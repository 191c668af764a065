"""LoRA training throughput: Atelier's loop against a loop written to the diffusers-example recipe.

Both train the same LoRA (same base, data, seed, batch size, precision). The reference does what the
diffusers example scripts do: VAE-encode and text-encode every batch, plain (foreach) AdamW, and a
`loss.item()` for the progress bar every step. Atelier's side is the real `core.training.loop.train`
(latents and embeddings cached once, fused AdamW on CUDA, channels_last, no per-step host syncs).
Reports images/s for each and the ratio; timing starts after warm-up steps on both sides.

    python bench/train_throughput.py --base tiny-sd                 # CPU, the built-in tiny base
    python bench/train_throughput.py --size sd15 --batch-size 16    # CUDA, SD1.5-sized random weights
    python bench/train_throughput.py --size sdxl --batch-size 4     # CUDA, SDXL-sized random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.methods.lora import unet_targets
from core.methods.params import JobSpec
from core.training.caching import encode_text, tokenize
from core.training.loop import resolve_precision, train
from core.training.progress import NullHooks

PROMPTS = ["a red circle on a blue background", "a photo of sks", "a solid green image", "a yellow square"]


@dataclass
class Item:
    image: Image.Image
    caption: str


def make_items(n: int, size: int, seed: int) -> list[Item]:
    """Coloured rectangles on coloured backgrounds; content does not matter for throughput."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
        items.append(Item(Image.fromarray(pixels), PROMPTS[i % len(PROMPTS)]))
    return items


class TimingHooks(NullHooks):
    """Asks for a report (one host sync) only after the warm-up step and at the end."""

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup = warmup
        self.marks: dict[int, float] = {}

    def should_report(self, step: int) -> bool:
        return step == self.warmup

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self.marks[step] = time.perf_counter()  # loss.item() has just synced the device


def atelier_rate(base: Any, items: list[Item], args: argparse.Namespace, device: torch.device) -> float:
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="bench",
        params={"method": "lora", "rank": args.rank},
        training={
            "max_steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "learning_rate": 1e-4,
            "resolution": args.resolution,
            "gradient_checkpointing": args.gradient_checkpointing,
            "seed": args.seed,
        },
    )
    hooks = TimingHooks(args.warmup)
    with tempfile.TemporaryDirectory() as workdir:
        train(spec=spec, base=base, items=items, workdir=Path(workdir), hooks=hooks, device=device)
    elapsed = hooks.marks[args.warmup + args.steps] - hooks.marks[args.warmup]
    return args.steps * args.batch_size / elapsed


def _pixels(items: list[Item], size: int) -> torch.Tensor:
    """The example's Resize + CenterCrop + Normalize, done once up front (which favours the reference)."""
    from core.training.buckets import place, resize_and_crop
    from core.training.caching import to_pixels

    return torch.stack(
        [to_pixels(resize_and_crop(i.image, place(*i.image.size, (size, size)))) for i in items]
    )


def _reference_setup(base: Any, args: argparse.Namespace, device: torch.device) -> tuple[Any, list, Any]:
    """LoRA on the UNet attention as the example sets it up: frozen weights in the training dtype,
    LoRA parameters upcast to fp32, plain AdamW, a constant lr schedule."""
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    precision = resolve_precision("auto", device)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        module = getattr(base, name)
        if module is not None:
            module.requires_grad_(False).to(device, precision.weight_dtype)
    base.unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=unet_targets("attention"),
        )
    )
    params = [p for p in base.unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return precision, params, (optimizer, get_scheduler("constant", optimizer=optimizer))


def reference_rate(base: Any, items: list[Item], args: argparse.Namespace, device: torch.device) -> float:
    precision, params, (optimizer, lr_scheduler) = _reference_setup(base, args, device)
    size = args.resolution or base.resolution
    pixels = _pixels(items, size)
    ids, ids_2 = tokenize(base, [item.caption for item in items])
    scheduler = base.noise_scheduler
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    dtype = precision.autocast_dtype
    base.unet.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        index = torch.randint(0, len(items), (args.batch_size,), generator=generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            batch = pixels[index].to(device, precision.weight_dtype)
            latents = base.vae.encode(batch).latent_dist.sample() * base.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden, pooled = encode_text(
                base, ids[index].to(device), None if ids_2 is None else ids_2[index].to(device)
            )
            added = (
                None
                if pooled is None
                else {"text_embeds": pooled, "time_ids": time_ids.repeat(len(index), 1)}
            )
            target = (
                noise
                if scheduler.config.prediction_type == "epsilon"
                else scheduler.get_velocity(latents, noise, timesteps)
            )
            prediction = base.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
            loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the example's progress bar shows the step loss every step
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Real SD1.5 / SDXL sizes (the published configs), random weights: throughput depends on shapes only.
SD15_UNET = {
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def sized_base(size: str, folder: Path, device: torch.device) -> Any:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from core.base_loader import BaseModels
    from core.tiny.components import BOS_ID, EOS_ID, load_tokenizer, write_tokenizer

    torch.manual_seed(0)
    # The tiny bases' offline byte-level CLIP tokenizer; the encoders keep CLIP's real vocab size.
    write_tokenizer(folder / "tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer")
    special = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
    }
    sdxl = size == "sdxl"
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes on the host
        unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET))
        vae = AutoencoderKL(
            **VAE, scaling_factor=0.13025 if sdxl else 0.18215, sample_size=1024 if sdxl else 512
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **special))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **special)) if sdxl else None
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return BaseModels(
        model_id=f"random-{size}",
        family="sdxl" if sdxl else "sd",
        path=folder,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        tokenizer_2=tokenizer if sdxl else None,
        text_encoder_2=text_encoder_2,
        vae=vae,
        unet=unet,
        noise_scheduler=scheduler,
    )


def load_named_base(model_id: str) -> Any:
    from core.base_loader import load_base
    from core.config import get_settings

    return load_base(model_id, settings=get_settings(), device="cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", default="tiny-sd", help="a configured base model id (default tiny-sd)")
    which.add_argument("--size", choices=["sd15", "sdxl"], help="real-size architecture, random weights")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="default: the base's native size")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()
    if args.size and args.resolution is None:
        args.resolution = 1024 if args.size == "sdxl" else 512
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if args.size and device.type != "cuda" and args.device != "cpu":
        sys.exit("--size builds SD1.5/SDXL-sized models: it needs CUDA (or pass --device cpu knowingly)")
    with tempfile.TemporaryDirectory() as folder:

        def fresh_base() -> Any:
            if args.size:
                return sized_base(args.size, Path(folder), device)
            return load_named_base(args.base)

        probe = fresh_base()
        size = args.resolution or probe.resolution
        del probe
        items = make_items(args.images, size, args.seed)
        reference = reference_rate(fresh_base(), items, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        atelier = atelier_rate(fresh_base(), items, args, device)
    report = {
        "model": args.size or args.base,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
        "batch_size": args.batch_size,
        "resolution": size,
        "steps": args.steps,
        "reference_img_s": round(reference, 3),
        "atelier_img_s": round(atelier, 3),
        "ratio": round(atelier / reference, 2),
    }
    print(f"reference (diffusers-example recipe): {reference:8.2f} img/s")
    print(f"atelier loop (cached latents/embeds): {atelier:8.2f} img/s")
    print(f"ratio atelier/reference:              {atelier / reference:8.2f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
