"""Aspect-ratio buckets: every image trains at a size close to its own shape with area ~ resolution².

Sizes are multiples of `step` (the VAE factor times the UNet's down-sampling, at least 8 latent
pixels), so every bucket is a valid UNet input. An image goes to the bucket with the nearest aspect
ratio, is resized to cover it and centre-cropped; the crop's top-left corner is kept because SDXL
conditions on it. Batches are always drawn from one bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Wider than 2:1 wastes most of a bucket on few images and is rare in fine-tuning sets.
MAX_ASPECT = 2.0


@dataclass(frozen=True)
class Placement:
    """Where one image lands: bucket size, its original size and the crop taken from the resized image."""

    size: tuple[int, int]  # (width, height) of the bucket
    original: tuple[int, int]  # (width, height) of the source image
    resized: tuple[int, int]  # (width, height) after the covering resize, before the crop
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= resolution², aspect within max_aspect."""
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    area = resolution * resolution
    sizes = {(resolution - resolution % step,) * 2}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
        width += step
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 1:2 and 2:1 are equally far from 1:1);
    ties go to the larger area."""
    log_ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - log_ratio), -s[0] * s[1]))


def place(width: int, height: int, size: tuple[int, int]) -> Placement:
    bucket_w, bucket_h = size
    scale = max(bucket_w / width, bucket_h / height)
    # Round up so rounding never leaves the resized image a pixel short of the bucket.
    resized = (
        max(bucket_w, math.ceil(width * scale - 1e-6)),
        max(bucket_h, math.ceil(height * scale - 1e-6)),
    )
    top = (resized[1] - bucket_h) // 2
    left = (resized[0] - bucket_w) // 2
    return Placement(size=size, original=(width, height), resized=resized, crop_top_left=(top, left))


def resize_and_crop(image: Image.Image, placement: Placement) -> Image.Image:
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
    top, left = placement.crop_top_left
    width, height = placement.size
    return image.crop((left, top, left + width, top + height))


def assign(
    image_sizes: list[tuple[int, int]], resolution: int, step: int
) -> tuple[list[Placement], dict[tuple[int, int], list[int]]]:
    """Placement per image and the image indices per bucket size (only buckets in use)."""
    sizes = bucket_sizes(resolution, step)
    placements = [place(w, h, nearest_bucket(w, h, sizes)) for w, h in image_sizes]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, placement in enumerate(placements):
        groups.setdefault(placement.size, []).append(index)
    return placements, dict(sorted(groups.items()))


class BucketSampler:
    """Which images form global batch number `index`: a pure function of (seed, index).

    Each epoch shuffles the images within every bucket, cuts them into batches (the last one of a
    bucket may be short) and shuffles the batches, all from a generator seeded with (seed, epoch).
    The number of batches per epoch is fixed, so batch `index` can be found without replaying the
    run: a resumed job continues on exactly the data the uninterrupted one would have seen.
    """

    def __init__(self, bucket_lengths: list[int], batch_size: int, seed: int) -> None:
        if not bucket_lengths or min(bucket_lengths) < 1:
            raise ValueError("every bucket needs at least one image")
        self.bucket_lengths = bucket_lengths
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in bucket_lengths)
        self._epoch: int | None = None
        self._plan: list[tuple[int, list[int]]] = []

    def _epoch_plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        plan: list[tuple[int, list[int]]] = []
        for bucket, length in enumerate(self.bucket_lengths):
            order = rng.permutation(length).tolist()
            plan += [(bucket, order[i : i + self.batch_size]) for i in range(0, length, self.batch_size)]
        return [plan[i] for i in rng.permutation(len(plan))]

    def batch(self, index: int) -> tuple[int, list[int]]:
        """(bucket number, row numbers within that bucket) of global batch `index`."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._epoch_plan(epoch)
        return self._plan[position]
