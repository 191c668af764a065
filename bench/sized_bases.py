"""Bases for the bench: a configured one by id, or SD1.5 / SDXL shapes with random weights.

Throughput depends on shapes only, so the real-size bases are the published architectures with
random weights, built on the device in seconds instead of downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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
CLIP_VOCAB = 49408


def sized_tokenizer(folder: Path) -> Any:
    """The tiny bases' offline byte-level CLIP tokenizer, its vocabulary padded to CLIP's 49408.

    The padding entries are multi-character symbols a merge-free BPE never produces, so text
    tokenizes exactly as before; what they buy is `len(tokenizer) == vocab_size`, so a token added
    by Textual Inversion gets id 49408, the row a resized real-size embedding matrix gives it.
    """
    from core.tiny.components import load_tokenizer, write_tokenizer

    write_tokenizer(folder)
    vocab_file = folder / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    vocab |= {f"<bench-pad-{i}>": i for i in range(len(vocab), CLIP_VOCAB)}
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == CLIP_VOCAB, len(tokenizer)
    return tokenizer


def sized_base(size: str, folder: Path, device: torch.device) -> Any:
    """SD1.5 (`sd15`) or SDXL (`sdxl`) shapes, random weights, fp32 on `device`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from core.base_loader import BaseModels
    from core.tiny.components import BOS_ID, EOS_ID

    torch.manual_seed(0)
    special = {
        "vocab_size": CLIP_VOCAB,
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
        tokenizer=sized_tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder,
        # Its own instance: Textual Inversion adds its tokens to each tokenizer separately.
        tokenizer_2=sized_tokenizer(folder / "tokenizer_2") if sdxl else None,
        text_encoder_2=text_encoder_2,
        vae=vae,
        unet=unet,
        noise_scheduler=scheduler,
    )


def load_named_base(model_id: str) -> Any:
    """A configured base (tiny-sd, tiny-sdxl, an allowed hub model), fp32 on the host."""
    from core.base_loader import load_base
    from core.config import get_settings

    return load_base(model_id, settings=get_settings(), device="cpu")
