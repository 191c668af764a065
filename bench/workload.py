"""The bench's data, the same for both loops: images, captions, conditioning masks, class images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a red circle on a blue background", "a photo of sks", "a solid green image", "a yellow square"]
INSTANCE_PROMPT = "a photo of sks"
CLASS_PROMPT = "a photo of a square"
PLACEHOLDER = "<bench-token>"
INITIALIZER = "x"
# What the Textual Inversion example trains on: templates around the placeholder, one per sample.
TI_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
)


@dataclass
class Item:
    """A dataset item as the worker hands it to the loop (core.datasets.ingest.DatasetItem's fields)."""

    image: Image.Image
    caption: str
    conditioning: Image.Image | None = None


def make_items(n: int, size: int, seed: int, *, conditioning: bool = False) -> list[Item]:
    """Coloured squares on coloured backgrounds; content does not matter for throughput. With
    `conditioning`, each gets the square's white-on-black mask, as a ControlNet dataset would."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        mask = np.zeros((size, size, 3), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top : top + size // 2, left : left + size // 2] = rng.integers(0, 256, 3)
        mask[top : top + size // 2, left : left + size // 2] = 255
        control = Image.fromarray(mask) if conditioning else None
        items.append(Item(Image.fromarray(pixels), PROMPTS[i % len(PROMPTS)], control))
    return items


def to_unit_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: the examples' Resize + CenterCrop + ToTensor, done once up front
    (which favours the reference); the images are square and already `size`."""
    from core.training.buckets import place, resize_and_crop

    arrays = [
        np.asarray(resize_and_crop(image.convert("RGB"), place(*image.size, (size, size))), np.float32)
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def to_model_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """As `to_unit_pixels`, then the examples' Normalize([0.5], [0.5]) into [-1, 1]."""
    return to_unit_pixels(images, size) * 2.0 - 1.0


def vae_factor(base: object) -> int:
    return 2 ** (len(base.vae.config.block_out_channels) - 1)  # type: ignore[attr-defined]


def controlnet_channels(base: object) -> list[int]:
    """diffusers' default conditioning embedding (16, 32, 96, 256) downsamples 8x; one entry fewer
    per halving fewer, so the tiny bases' factor-2 VAE gets (16, 32)."""
    return [16, 32, 96, 256][: int(math.log2(vae_factor(base))) + 1]
