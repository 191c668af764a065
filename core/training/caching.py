"""Everything the frozen parts of the base compute, computed once per job.

Each image's latent distribution is encoded once (core/training/latents.py). Captions are encoded
once per distinct caption when the text encoders are frozen; when one trains, only the token ids are
kept and the method encodes them every step. The cache lives on the training device when it fits (no
copies per step) and in pinned host memory otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from core.training.buckets import BucketSampler, assign
from core.training.latents import BucketCache, ImageFeatures, bucket_step, cache_bucket

TEXT_CHUNK = 32
# Keep the cache on the GPU below this size; above it, pinned host memory and async copies.
DEVICE_CACHE_BYTES = 4 << 30


class CaptionedImage(Protocol):
    """A dataset item as the worker loads it (core.datasets.ingest.DatasetItem)."""

    image: Any  # PIL image
    caption: str | None


@dataclass
class TrainingItem:
    """One image as the loop caches it: what a method's `training_items` makes of a dataset item."""

    image: Any  # PIL RGB image
    # Alternatives: each use of the image draws one (textual inversion's templates); usually one.
    captions: tuple[str, ...]
    conditioning: Any | None = None  # PIL RGB image, same aspect as `image` (ControlNet)


@dataclass
class TrainingSet:
    items: list[TrainingItem]
    # DreamBooth's class images: every micro-batch then carries a prior micro-batch of the same size.
    prior: list[TrainingItem] | None = None


@dataclass
class Batch:
    """One micro-batch as the methods see it; optional fields depend on the base and the method."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None  # cached text embeddings
    pooled_embeds: torch.Tensor | None = None  # SDXL: cached pooled embeddings of encoder 2
    input_ids: torch.Tensor | None = None  # when a text encoder trains
    input_ids_2: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    # The empty prompt's conditioning, (1, ...), for methods that drop captions to train guidance:
    # cached embeddings when the text encoders are frozen, else token ids.
    uncond_hidden_states: torch.Tensor | None = None
    uncond_pooled_embeds: torch.Tensor | None = None
    uncond_input_ids: torch.Tensor | None = None
    uncond_input_ids_2: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1], pixel size (ControlNet)
    image_features: torch.Tensor | None = None  # (B, ...) from Trainable.image_features (IP-Adapter)
    # One uniform [0, 1) draw per sample from the step's generator, for per-sample dropout decisions
    # (drop the caption, the image, both) that stay a pure function of (seed, step).
    drop: torch.Tensor | None = None
    prior: Batch | None = None  # DreamBooth: the class-image micro-batch drawn with this one

    def __len__(self) -> int:
        return self.latents.shape[0]


def tokenize(base: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    def ids(tokenizer: Any) -> torch.Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return ids(base.tokenizer), (ids(base.tokenizer_2) if base.tokenizer_2 is not None else None)


def encode_text(
    base: Any, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the base's pipeline makes them: (hidden states, pooled or None).

    SD1/2 use the last hidden state. SDXL concatenates the penultimate hidden states of both
    encoders and takes the pooled (projected) embedding from encoder 2.
    """
    if base.text_encoder_2 is None:
        return base.text_encoder(input_ids)[0], None
    first = base.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
    second = base.text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first, second.hidden_states[-2]], dim=-1)
    return hidden, second[0]


@dataclass
class TextCache:
    hidden: torch.Tensor | None  # (captions, L, D) when the text encoders are frozen
    pooled: torch.Tensor | None
    input_ids: torch.Tensor | None  # (captions, L) when a text encoder trains
    input_ids_2: torch.Tensor | None
    empty_index: int = 0  # the row of the empty prompt ("" is always cached)


@torch.no_grad()
def _cache_text(base: Any, captions: list[str], *, encode: bool) -> TextCache:
    empty = captions.index("")
    input_ids, input_ids_2 = tokenize(base, captions)
    if not encode:
        return TextCache(None, None, input_ids, input_ids_2, empty)
    device = base.text_encoder.device
    hidden, pooled = [], []
    for start in range(0, len(captions), TEXT_CHUNK):
        part = slice(start, start + TEXT_CHUNK)
        ids_2 = input_ids_2[part].to(device) if input_ids_2 is not None else None
        h, p = encode_text(base, input_ids[part].to(device), ids_2)
        hidden.append(h)
        pooled.append(p)
    return TextCache(torch.cat(hidden), None if pooled[0] is None else torch.cat(pooled), None, None, empty)


def step_generators(seed: int, index: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(host, device) generators for micro-batch `index`, seeded from (seed, index) alone."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    derived = (int(state[0]) << 31) ^ int(state[1])
    host = torch.Generator("cpu").manual_seed(derived)
    on_device = host if device.type == "cpu" else torch.Generator(device).manual_seed(derived)
    return host, on_device


class TrainingData:
    """The cached dataset and the data order: micro-batch `index` is a pure function of (seed, index)."""

    def __init__(
        self,
        buckets: list[BucketCache],
        text: TextCache,
        *,
        batch_size: int,
        seed: int,
        noise_offset: float,
        num_train_timesteps: int,
        device: torch.device,
    ) -> None:
        self.seed, self.device = seed, device
        self.noise_offset, self.num_train_timesteps = noise_offset, num_train_timesteps
        self.sampler = BucketSampler([len(b.caption_index) for b in buckets], batch_size, seed)
        self.image_count = sum(len(b.caption_index) for b in buckets)
        nbytes = sum(t.nbytes for b in buckets for t in (b.mean, b.std, b.conditioning) if t is not None)
        # On CUDA a cache that fits stays on the GPU; a larger one waits in pinned host memory.
        self._store = torch.device("cpu") if nbytes > DEVICE_CACHE_BYTES else device
        pin = self._store.type == "cpu" and device.type == "cuda"
        self.buckets = [
            BucketCache(
                b.size,
                *(
                    self._keep(t, pin)
                    for t in (
                        b.mean,
                        b.std,
                        b.time_ids,
                        b.caption_index,
                        b.caption_count,
                        b.conditioning,
                        b.features,
                    )
                ),
            )
            for b in buckets
        ]
        self.text = TextCache(
            *(self._keep(t, pin) for t in (text.hidden, text.pooled, text.input_ids, text.input_ids_2)),
            text.empty_index,
        )
        self._empty = torch.tensor([text.empty_index], dtype=torch.long, device=self._store)

    def _keep(self, tensor: torch.Tensor | None, pin: bool) -> torch.Tensor | None:
        if tensor is None:
            return None
        tensor = tensor.to(self._store)
        return tensor.pin_memory() if pin else tensor

    def _gather(self, tensor: torch.Tensor | None, *index: torch.Tensor) -> torch.Tensor | None:
        if tensor is None:
            return None
        picked = tensor[index]
        if picked.device != self.device:
            picked = picked.pin_memory().to(self.device, non_blocking=True)
        return picked

    def _indices(self, host_indices: torch.Tensor) -> torch.Tensor:
        """Row/flip indices onto the cache's device. A plain copy from pageable memory would wait
        for every queued kernel (a host sync per step); a pinned, non-blocking one does not."""
        if self._store.type == "cpu":
            return host_indices
        return host_indices.pin_memory().to(self._store, non_blocking=True)

    def micro_batch(self, index: int) -> Batch:
        bucket_no, rows = self.sampler.batch(index)
        bucket = self.buckets[bucket_no]
        host, on_device = step_generators(self.seed, index, self.device)
        flips = torch.randint(0, bucket.mean.shape[1], (len(rows),), generator=host)
        rows_t, flips = self._indices(torch.stack([torch.tensor(rows, dtype=torch.long), flips]))
        mean, std = self._gather(bucket.mean, rows_t, flips), self._gather(bucket.std, rows_t, flips)
        latents = mean + std * torch.randn(mean.shape, generator=on_device, device=self.device)
        noise = torch.randn(latents.shape, generator=on_device, device=self.device)
        if self.noise_offset:
            # Offset noise (per image and channel) lets the model learn very dark / very bright images.
            offset = torch.randn(latents.shape[:2], generator=on_device, device=self.device)
            noise = noise + self.noise_offset * offset[:, :, None, None]
        timesteps = torch.randint(
            0, self.num_train_timesteps, (len(rows),), generator=on_device, device=self.device
        )
        # One caption alternative per sample, drawn after everything above so a dataset with one
        # caption per image keeps the random stream it always had.
        # Drawn where the cache lives, so the pick never crosses devices (no host sync).
        where = host if self._store.type == "cpu" else on_device
        count = bucket.caption_count[rows_t]
        pick = (torch.rand(count.shape, generator=where, device=self._store) * count).long()
        captions = bucket.caption_index[rows_t, pick]
        drop = torch.rand((len(rows),), generator=on_device, device=self.device)
        conditioning = self._gather(bucket.conditioning, rows_t, flips)
        text = self.text
        return Batch(
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            encoder_hidden_states=self._gather(text.hidden, captions),
            pooled_embeds=self._gather(text.pooled, captions),
            input_ids=self._gather(text.input_ids, captions),
            input_ids_2=self._gather(text.input_ids_2, captions),
            time_ids=self._gather(bucket.time_ids, rows_t, flips),
            uncond_hidden_states=self._gather(text.hidden, self._empty),
            uncond_pooled_embeds=self._gather(text.pooled, self._empty),
            uncond_input_ids=self._gather(text.input_ids, self._empty),
            uncond_input_ids_2=self._gather(text.input_ids_2, self._empty),
            conditioning=conditioning.float() / 255.0 if conditioning is not None else None,
            image_features=self._gather(bucket.features, rows_t),
            drop=drop,
        )


class PairedData:
    """DreamBooth's prior preservation: each instance micro-batch carries a class micro-batch of the
    same size, drawn from the class images with its own seed, as `batch.prior`."""

    def __init__(self, instance: TrainingData, prior: TrainingData) -> None:
        self.instance, self.prior = instance, prior
        self.image_count = instance.image_count

    def micro_batch(self, index: int) -> Batch:
        batch = self.instance.micro_batch(index)
        batch.prior = self.prior.micro_batch(index)
        return batch


def build_training_data(
    *,
    base: Any,
    items: list[TrainingItem],
    resolution: int,
    random_flip: bool,
    encode_captions: bool,
    batch_size: int,
    seed: int,
    noise_offset: float,
    device: torch.device,
    image_features: ImageFeatures | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> TrainingData:
    """Bucket, encode and cache `items` once; `encode_captions=False` keeps token ids instead.
    `on_progress(done, total)` follows the VAE through the images (a few per call)."""
    if not items:
        raise ValueError("the dataset has no images")
    items = [_rgb(item) for item in items]
    # "" is always cached: methods that drop captions to train guidance use it.
    unique = sorted({""} | {c for item in items for c in item.captions})
    row = {caption: i for i, caption in enumerate(unique)}
    caption_rows = [[row[c] for c in (item.captions or ("",))] for item in items]
    placements, groups = assign([item.image.size for item in items], resolution, bucket_step(base))
    flips = 2 if random_flip else 1
    views_done = 0

    def encoded(views: int) -> None:
        nonlocal views_done
        views_done += views
        if on_progress is not None:
            on_progress(views_done // flips, len(items))

    buckets = [
        cache_bucket(
            base,
            [items[i] for i in members],
            [placements[i] for i in members],
            [caption_rows[i] for i in members],
            flips,
            image_features,
            encoded,
        )
        for members in groups.values()
    ]
    return TrainingData(
        buckets,
        _cache_text(base, unique, encode=encode_captions),
        batch_size=batch_size,
        seed=seed,
        noise_offset=noise_offset,
        num_train_timesteps=int(base.noise_scheduler.config.num_train_timesteps),
        device=device,
    )


def _rgb(item: TrainingItem) -> TrainingItem:
    if item.image.mode == "RGB":
        return item
    return TrainingItem(item.image.convert("RGB"), item.captions, item.conditioning)
