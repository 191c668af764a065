"""What is computed once per training image, bucket by bucket: latents, time ids, conditioning.

The VAE never trains, so each image's latent distribution (mean and std, both flips when flipping is
on) is encoded once; each step then only samples `mean + std * noise`, as the diffusers recipe does
when it encodes every step. core/training/caching.py caches the captions beside it and samples the
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from core.training.buckets import Placement, resize_and_crop
from core.training.memory import encode_chunk

ImageFeatures = Callable[[list[Any]], torch.Tensor | None]  # training crops -> (n, ...) features


class ConditionedImage(Protocol):
    """A training image as the cache reads it (core.training.caching.TrainingItem)."""

    image: Any  # PIL RGB image
    conditioning: Any | None  # PIL RGB image, same aspect as `image` (ControlNet)


def bucket_step(base: Any) -> int:
    """Pixel multiple every bucket side must have: VAE factor × UNet down-sampling (at least 8×)."""
    vae_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(base.unet.config.down_block_types) - 1)
    return vae_factor * max(8, unet_factor)


def to_pixels(image: Any) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def time_ids_for(placement: Placement, flipped: bool) -> list[float]:
    """SDXL micro-conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
    width, height = placement.size
    top, left = placement.crop_top_left
    if flipped:  # the crop's left edge, seen in the mirrored image
        left = placement.resized[0] - left - width
    return [placement.original[1], placement.original[0], top, left, height, width]


@dataclass
class BucketCache:
    size: tuple[int, int]  # (width, height) in pixels
    mean: torch.Tensor  # (n, flips, C, h, w), scaled latent space
    std: torch.Tensor
    time_ids: torch.Tensor  # (n, flips, 6): original size, crop top-left, target size (all h, w)
    caption_index: torch.Tensor  # (n, K): caption alternatives, padded by repeating
    caption_count: torch.Tensor  # (n,): how many of the K are real
    conditioning: torch.Tensor | None = None  # (n, flips, 3, H, W) uint8 pixels
    features: torch.Tensor | None = None  # (n, ...) from the method's image_features


@torch.no_grad()
def _encode_latents(
    vae: Any, pixels: torch.Tensor, on_encoded: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, stds) of the latents of `pixels`; `on_encoded(n)` after each VAE call of n views."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    # The fp32 VAE keeps several full-resolution, 128-wide tensors alive per image: eight 1024 px
    # images at once would take ~13 GB of a GPU. The planner (core/training/memory.py) sizes the
    # same chunks.
    for chunk in pixels.split(encode_chunk(pixels.shape[-2] * pixels.shape[-1])):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append((dist.mean.float() - shift) * scale)
        stds.append(dist.std.float() * scale)
        if on_encoded is not None:
            on_encoded(len(chunk))
    return torch.cat(means), torch.cat(stds)


def cache_bucket(
    base: Any,
    items: Sequence[ConditionedImage],
    placements: Sequence[Placement],
    caption_rows: list[list[int]],
    flips: int,
    image_features: ImageFeatures | None,
    on_encoded: Callable[[int], None] | None = None,
) -> BucketCache:
    """Crop and encode one bucket's images once; `caption_rows[i]` are item i's rows in the text cache."""
    views, time_ids, crops, conditioning = [], [], [], []
    for item, placement in zip(items, placements, strict=True):
        crop = resize_and_crop(item.image, placement)
        crops.append(crop)
        pixels = to_pixels(crop)
        views += [pixels, pixels.flip(-1)][:flips]
        time_ids.append([time_ids_for(placement, flipped) for flipped in (False, True)[:flips]])
        if item.conditioning is not None:
            control = _conditioning_pixels(item.conditioning, item.image.size, placement)
            conditioning.append(torch.stack([control, control.flip(-1)][:flips]))
    if conditioning and len(conditioning) != len(items):
        raise ValueError("either every training image has a conditioning image or none does")
    mean, std = _encode_latents(base.vae, torch.stack(views), on_encoded)
    n = len(items)
    width = max(len(rows) for rows in caption_rows)
    features = image_features(crops) if image_features is not None else None
    return BucketCache(
        size=placements[0].size,
        mean=mean.view(n, flips, *mean.shape[1:]),
        std=std.view(n, flips, *std.shape[1:]),
        time_ids=torch.tensor(time_ids, dtype=torch.float32),
        caption_index=torch.tensor([(rows * width)[:width] for rows in caption_rows], dtype=torch.long),
        caption_count=torch.tensor([len(rows) for rows in caption_rows], dtype=torch.long),
        conditioning=torch.stack(conditioning) if conditioning else None,
        features=features.detach().float().cpu() if features is not None else None,
    )


def _conditioning_pixels(image: Any, image_size: tuple[int, int], placement: Placement) -> torch.Tensor:
    """The conditioning image cropped exactly as its image: (3, H, W) uint8."""
    image = image.convert("RGB")
    if image.size != image_size:  # same aspect (the dataset checks it), another size: match first
        image = image.resize(image_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(resize_and_crop(image, placement), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
