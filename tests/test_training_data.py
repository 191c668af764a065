"""What the cached training data hands each method: caption alternatives, the empty prompt,
conditioning images cropped and flipped with their image, per-image features, prior batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.training.caching import PairedData, TrainingItem, build_training_data, encode_text, tokenize
from tests import test_training_loop as shared

CPU = torch.device("cpu")
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
solid, load_tiny = shared.solid, shared.load_tiny


@pytest.fixture(scope="module")
def base(tiny_cache: Path):
    return load_tiny(tiny_cache)


def build(base, items: list[TrainingItem], **overrides):
    options = dict(
        base=base,
        items=items,
        resolution=32,
        random_flip=False,
        encode_captions=True,
        batch_size=2,
        seed=0,
        noise_offset=0.0,
        device=CPU,
    )
    return build_training_data(**(options | overrides))


def half(colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    """The left half `colour`, the right half black: any mirroring shows."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = colour
    return Image.fromarray(pixels)


def test_each_use_draws_one_caption_alternative_deterministically(base) -> None:
    captions = ("a photo of {}", "a picture of {}", "a render of {}")
    data = build(base, [TrainingItem(solid((200, 0, 0)), captions)], encode_captions=False, batch_size=1)
    decoded = [
        base.tokenizer.decode(data.micro_batch(i).input_ids[0], skip_special_tokens=True) for i in range(30)
    ]
    assert {d.replace(" ", "") for d in decoded} == {c.replace(" ", "") for c in captions}
    again = data.micro_batch(7).input_ids
    assert torch.equal(again, data.micro_batch(7).input_ids)


def test_the_empty_prompt_is_always_there(base) -> None:
    data = build(base, [TrainingItem(solid((0, 200, 0)), ("a green thing",))] * 2)
    batch = data.micro_batch(0)
    ids, _ = tokenize(base, [""])
    expected, _ = encode_text(base, ids, None)
    torch.testing.assert_close(batch.uncond_hidden_states, expected)
    assert batch.drop.shape == (2,) and bool(((batch.drop >= 0) & (batch.drop < 1)).all())
    tokens = build(base, [TrainingItem(solid((0, 200, 0)), ("a",))], encode_captions=False).micro_batch(0)
    assert torch.equal(tokens.uncond_input_ids, ids)


def test_conditioning_is_cropped_and_flipped_with_its_image(base) -> None:
    image = half((255, 0, 255), (48, 32))  # lands in a non-square bucket
    # Same aspect, twice the size: resized to the image first, then cropped the same way.
    conditioning = half((255, 255, 255), (96, 64))
    data = build(base, [TrainingItem(image, ("x",), conditioning)] * 2, random_flip=True)
    cached = data.buckets[0].conditioning  # (n, flips, 3, H, W) uint8
    height, width = data.buckets[0].size[1], data.buckets[0].size[0]
    assert cached.shape == (2, 2, 3, height, width)
    assert torch.equal(cached[0, 1], cached[0, 0].flip(-1))
    left, right = (
        cached[0, 0, :, :, : width // 4].float().mean(),
        cached[0, 0, :, :, -width // 4 :].float().mean(),
    )
    assert left > 200 and right < 50  # white where the image is magenta, not mirrored
    batch = data.micro_batch(0)
    assert batch.conditioning.shape == (2, 3, height, width)
    assert batch.conditioning.dtype == torch.float32 and float(batch.conditioning.max()) <= 1.0


def test_conditioning_for_some_images_only_is_refused(base) -> None:
    items = [TrainingItem(solid((1, 2, 3)), ("a",), solid((9, 9, 9))), TrainingItem(solid((1, 2, 3)), ("a",))]
    with pytest.raises(ValueError, match="conditioning"):
        build(base, items)


def test_image_features_follow_their_rows(base) -> None:
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    seen: list[int] = []

    def mean_colour(crops: list[Image.Image]) -> torch.Tensor:
        seen.append(len(crops))
        return torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32).mean(axis=(0, 1)) for c in crops]))

    items = [TrainingItem(solid(c), (f"colour {i}",)) for i, c in enumerate(colours)]
    data = build(base, items, encode_captions=False, image_features=mean_colour)
    assert seen == [4]  # once per image, at caching time
    for index in range(6):
        batch = data.micro_batch(index)
        for ids, features in zip(batch.input_ids, batch.image_features, strict=True):
            caption = base.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")
            expected = torch.tensor(colours[int(caption[-1])], dtype=torch.float32)
            torch.testing.assert_close(features, expected, atol=1.0, rtol=0)


def test_paired_data_carries_a_prior_batch_of_the_same_size(base) -> None:
    instance = build(base, [TrainingItem(solid((255, 0, 255)), ("sks",))] * 3)
    prior = build(base, [TrainingItem(solid((200, 80, 0)), ("a thing",))] * 5, seed=1)
    batch = PairedData(instance, prior).micro_batch(3)
    assert batch.prior is not None and len(batch.prior) == len(batch) == 2
    assert not torch.equal(batch.prior.encoder_hidden_states, batch.encoder_hidden_states)


def test_methods_that_ignore_conditioning_train_on_partly_conditioned_datasets(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """A dataset may carry conditioning images for some images only (it was made for ControlNet);
    a LoRA job on it uses the images and captions and leaves the conditioning alone."""
    from dataclasses import dataclass

    from core.jobs.artifact import train_artifact
    from core.spec.job import JobSpec
    from core.training.progress import NullHooks

    @dataclass
    class Conditioned:
        image: Image.Image
        caption: str | None
        conditioning: Image.Image | None

    items = [
        Conditioned(solid((200, 0, 200)), "a", solid((255, 255, 255))),
        Conditioned(solid((0, 0, 200)), "b", None),
    ]
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={"max_steps": 1, "batch_size": 2},
    )
    base = load_tiny(tiny_cache)  # its own copy: training adds adapters to the base it gets
    result = train_artifact(
        spec=spec, base=base, items=items, workdir=tmp_path, hooks=NullHooks(), device=CPU
    )
    assert result.steps == 1
