"""Architectures of base models as plain config dicts: what the memory planner and the compatibility
checks read, without torch and without downloading anything.

A base's architecture is the `config.json` of each component of its diffusers folder. For the
published bases users name most (SD 1.5, SD 2.1 and 2.1-base, SDXL base 1.0) the configs are
written here, with only the keys that decide shapes; a same-architecture fine-tune is declared in
settings (`base_architectures`) by the name of the one it shares. Local folders are read from disk,
the built-in tiny bases come from the table, and `bench/sized_bases.py` builds random-weight models
from these very dicts, so a test can compare them with diffusers' own classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd", "sdxl"]
CLIP_VOCAB = 49408
CLIP_TOKENS = 77

# --- published component configs (shape-deciding keys, as in the repos' config.json) ---------------
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
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
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
SDXL_VAE: dict[str, Any] = {**SD_VAE, "scaling_factor": 0.13025}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB,
    "max_position_embeddings": CLIP_TOKENS,
}
OPENCLIP_H: dict[str, Any] = {  # SD 2.x: 23 layers, the penultimate of OpenCLIP ViT-H's 24
    **CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
OPENCLIP_G: dict[str, Any] = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# h94/IP-Adapter's models/image_encoder (OpenCLIP ViT-H/14), what IP-Adapter on a real base reads.
VIT_H_IMAGE: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}

# The built-in tiny bases (core/bases/tiny/components.py); tests compare these with the built folders.
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "vocab_size": 2 * 256 + 2,
    "max_position_embeddings": CLIP_TOKENS,
}
_TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [1, 2],
    "norm_num_groups": 4,
}
_TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 1,
    "mid_block_add_attention": False,
    "scaling_factor": 0.18215,
}
_TINY_IMAGE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}


@dataclass(frozen=True)
class Architecture:
    """Every component's config; `text_encoders[1]` is SDXL's projected OpenCLIP encoder."""

    name: str
    family: Family
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    prediction_type: str = "epsilon"
    image_encoder: dict[str, Any] | None = None

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_factor

    def signature(self) -> dict[str, Any]:
        """What an artifact's tensors must fit (see core.bases.allow_list.architecture_of_folder)."""
        return {
            "block_out_channels": list(self.unet["block_out_channels"]),
            "cross_attention_dim": self.unet.get("cross_attention_dim"),
            "text_widths": [te["hidden_size"] for te in self.text_encoders],
        }


KNOWN: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("sd15", "sd", SD15_UNET, SD_VAE, (CLIP_L,), image_encoder=VIT_H_IMAGE),
        Architecture(
            "sd21", "sd", SD21_UNET, SD_VAE, (OPENCLIP_H,), "v_prediction", image_encoder=VIT_H_IMAGE
        ),
        Architecture(
            "sd21-base",
            "sd",
            {**SD21_UNET, "sample_size": 64},
            SD_VAE,
            (OPENCLIP_H,),
            image_encoder=VIT_H_IMAGE,
        ),
        Architecture("sdxl", "sdxl", SDXL_UNET, SDXL_VAE, (CLIP_L, OPENCLIP_G), image_encoder=VIT_H_IMAGE),
        Architecture(
            "tiny-sd",
            "sd",
            {**_TINY_UNET, "cross_attention_dim": 32},
            _TINY_VAE,
            ({**_TINY_TEXT, "num_hidden_layers": 2},),
            "v_prediction",
            image_encoder=_TINY_IMAGE,
        ),
        Architecture(
            "tiny-sdxl",
            "sdxl",
            {
                **_TINY_UNET,
                "cross_attention_dim": 64,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32,
            },
            _TINY_VAE,
            (
                {**_TINY_TEXT, "num_hidden_layers": 3},
                {**_TINY_TEXT, "num_hidden_layers": 3, "projection_dim": 32},
            ),
            "v_prediction",
            image_encoder=_TINY_IMAGE,
        ),
    )
}
# Hub repos whose architecture is one of the above (the names users give most often).
HUB_REPOS: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-2-base": "sd21-base",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def known_architecture(name: str) -> Architecture | None:
    return KNOWN.get(name)


def hub_architecture(repo_id: str) -> Architecture | None:
    name = HUB_REPOS.get(repo_id)
    return KNOWN[name] if name else None


def read_folder(folder: Path) -> Architecture | None:
    """The architecture of a diffusers pipeline folder from its JSON configs, or None."""
    index = read_json(folder / "model_index.json")
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    if index is None or unet is None or vae is None:
        return None
    family = pipeline_family(index)
    encoders = tuple(
        config
        for name in ("text_encoder", "text_encoder_2")
        if (config := read_json(folder / name / "config.json")) is not None
    )
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json") or {}
    image = read_json(folder / "image_encoder" / "config.json")
    return Architecture(
        name=folder.name,
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        image_encoder=image.get("vision_config", image) if image else None,
    )


def pipeline_family(model_index: dict[str, Any]) -> Family:
    """SDXL or SD, from a folder's model_index.json."""
    return "sdxl" if str(model_index.get("_class_name", "")).startswith("StableDiffusionXL") else "sd"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
