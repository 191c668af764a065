"""The shared training loop: exact resume, prediction targets, min-SNR, buckets, caching once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from PIL import Image
from safetensors.torch import load_file

from core.config import Settings
from core.jobs.artifact import train_artifact
from core.spec.job import JobSpec
from core.training import checkpoint
from core.training.buckets import BucketSampler, assign, bucket_sizes, nearest_bucket, place, resize_and_crop
from core.training.caching import TrainingItem, build_training_data
from core.training.latents import time_ids_for
from core.training.objective import DiffusionObjective
from core.training.progress import NullHooks, StopTraining

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny models are latency-bound: extra intra-op threads only add synchronisation, which on a
    # shared 2-core machine made these tests ten times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Item:
    image: Image.Image
    caption: str | None


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_cache(request: pytest.FixtureRequest) -> Path:
    """Where the tiny bases are built once for the whole run: conftest's shared `model_cache` when it
    exists (a folder or Settings), else the folder the end-to-end tests share."""
    try:
        value = request.getfixturevalue("model_cache")
    except pytest.FixtureLookupError:
        return Path(os.environ.get("ATELIER_TEST_MODEL_CACHE", "/tmp/atelier-test-models"))
    return Path(getattr(value, "model_cache", value))


def load_tiny(cache: Path, model_id: str = "tiny-sd"):
    from core.bases.loader import load_base

    return load_base(model_id, settings=Settings(model_cache=cache), device="cpu")


def items_for_loop() -> list[Item]:
    return [
        Item(solid((255, 0, 255)), "a photo of sks"),
        Item(solid((250, 120, 0)), "a photo of sks"),
        Item(solid((40, 200, 40), (48, 32)), "a green thing"),
        Item(solid((30, 30, 220)), None),
    ]


# --- buckets -----------------------------------------------------------------------------------


def test_bucket_sizes_are_multiples_of_the_step_with_the_target_area() -> None:
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert width * height >= 0.7 * 512 * 512
        assert max(width / height, height / width) <= 2.0
    assert sizes == sorted(sizes)


@pytest.mark.parametrize(
    ("image", "bucket"),
    [
        ((1000, 1000), (512, 512)),
        ((1024, 768), (576, 448)),
        ((768, 1024), (448, 576)),
        ((3000, 500), (640, 384)),
    ],
)
def test_images_go_to_the_bucket_with_the_nearest_aspect(
    image: tuple[int, int], bucket: tuple[int, int]
) -> None:
    assert nearest_bucket(*image, bucket_sizes(512, 64)) == bucket


def test_placement_covers_the_bucket_and_crops_the_centre() -> None:
    placement = place(1024, 768, (576, 448))
    assert placement.resized[0] >= 576 and placement.resized[1] >= 448
    assert placement.resized == (598, 448)  # scale 448/768, width rounded up
    assert placement.crop_top_left == (0, 11)
    image = Image.new("RGB", (1024, 768))
    assert resize_and_crop(image, placement).size == (576, 448)
    # SDXL micro-conditioning: original (h, w), crop (top, left) - mirrored when flipped - target (h, w).
    assert time_ids_for(placement, flipped=False) == [768, 1024, 0, 11, 448, 576]
    assert time_ids_for(placement, flipped=True) == [768, 1024, 0, 598 - 576 - 11, 448, 576]


def test_assign_groups_images_by_bucket() -> None:
    placements, groups = assign([(64, 64), (96, 48), (64, 64), (48, 96)], 64, 16)
    assert {size: members for size, members in groups.items()} == {
        (64, 64): [0, 2],
        placements[1].size: [1],
        placements[3].size: [3],
    }
    assert placements[1].size[0] > placements[1].size[1] and placements[3].size[0] < placements[3].size[1]


def test_data_order_is_a_pure_function_of_seed_and_index() -> None:
    lengths = [5, 2, 3]
    running = BucketSampler(lengths, batch_size=2, seed=7)
    sequence = [running.batch(i) for i in range(3 * running.batches_per_epoch)]
    fresh = [BucketSampler(lengths, batch_size=2, seed=7).batch(i) for i in range(len(sequence))]
    assert sequence == fresh
    per_epoch = running.batches_per_epoch
    assert per_epoch == 3 + 1 + 2
    for epoch in range(3):
        seen = sorted(
            (b, row) for b, rows in sequence[epoch * per_epoch : (epoch + 1) * per_epoch] for row in rows
        )
        assert seen == [(b, row) for b, n in enumerate(lengths) for row in range(n)]  # every image once
    assert sequence[:per_epoch] != sequence[per_epoch : 2 * per_epoch]  # reshuffled each epoch
    assert sequence != [BucketSampler(lengths, 2, seed=8).batch(i) for i in range(len(sequence))]


# --- objective ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_the_schedulers_prediction_type(prediction_type: str) -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    objective = DiffusionObjective(scheduler, device=CPU)
    generator = torch.Generator().manual_seed(0)
    latents, noise = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    timesteps = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        objective.add_noise(latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps)
    )
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(objective.target(latents, noise, timesteps), expected)
    if prediction_type == "v_prediction":
        assert not torch.allclose(objective.target(latents, noise, timesteps), noise)


def test_unknown_prediction_type_is_refused() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionObjective(DDPMScheduler(prediction_type="sample"), device=CPU)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type: str) -> None:
    gamma = 5.0
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    objective = DiffusionObjective(scheduler, device=CPU, min_snr_gamma=gamma)
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weights = objective.weights(timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (
        snr if prediction_type == "epsilon" else snr + 1
    )
    torch.testing.assert_close(weights, expected)
    # Low noise (high SNR) is down-weighted; under epsilon, noisy steps keep weight 1.
    assert weights[0] < weights[-1] if prediction_type == "epsilon" else weights[0] < 0.01
    if prediction_type == "epsilon":
        assert weights[-1] == pytest.approx(1.0)
    assert DiffusionObjective(scheduler, device=CPU).weights(timesteps) is None


def test_min_snr_weights_scale_the_loss() -> None:
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    plain = DiffusionObjective(scheduler, device=CPU)
    weighted = DiffusionObjective(scheduler, device=CPU, min_snr_gamma=5.0)
    latents, noise, prediction = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    timesteps = torch.tensor([10, 900])
    per_sample = torch.stack(
        [
            plain.loss(prediction[i : i + 1], latents[i : i + 1], noise[i : i + 1], timesteps[i : i + 1])
            for i in range(2)
        ]
    )
    expected = (per_sample * weighted.weights(timesteps)).mean()
    torch.testing.assert_close(weighted.loss(prediction, latents, noise, timesteps), expected)


# --- caching -----------------------------------------------------------------------------------


def test_latents_and_embeddings_are_computed_once(tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    base = load_tiny(tiny_cache)
    encodes: list[int] = []
    text_calls: list[int] = []
    original_encode, original_text = base.vae.encode, base.text_encoder.forward

    def counting_encode(pixels, *args, **kwargs):
        encodes.append(pixels.shape[0])
        return original_encode(pixels, *args, **kwargs)

    def counting_text(*args, **kwargs):
        text_calls.append(1)
        return original_text(*args, **kwargs)

    monkeypatch.setattr(base.vae, "encode", counting_encode)
    monkeypatch.setattr(base.text_encoder, "forward", counting_text)
    items = items_for_loop()
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={"max_steps": 6, "batch_size": 2, "random_flip": True},
    )
    result = train_artifact(
        spec=spec, base=base, items=items, workdir=tmp_path, hooks=NullHooks(), device=CPU
    )
    assert result.steps == 6
    assert sum(encodes) == 2 * len(items)  # each image once per flip, never again per step
    assert len(text_calls) == 1  # three distinct captions, one batch


def test_caption_ids_are_kept_when_the_text_encoder_trains(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache)
    data = build_training_data(
        base=base,
        items=[TrainingItem(i.image, (i.caption or "",)) for i in items_for_loop()],
        resolution=32,
        random_flip=False,
        encode_captions=False,
        batch_size=2,
        seed=0,
        noise_offset=0.0,
        device=CPU,
    )
    assert data.text.hidden is None and data.text.input_ids is not None
    batch = data.micro_batch(0)
    assert batch.encoder_hidden_states is None and batch.input_ids.shape[0] == len(batch)
    again = data.micro_batch(0)
    torch.testing.assert_close(batch.noise, again.noise)  # noise is a function of (seed, index)
    assert not torch.equal(batch.noise[:1], data.micro_batch(1).noise[:1])


# --- resume ------------------------------------------------------------------------------------


class StopAfterCheckpoint(NullHooks):
    """Keeps the first checkpoint, then stops the run as a lost lease would."""

    def __init__(self, keep: Path) -> None:
        super().__init__()
        self.keep = keep
        self.saved: tuple[int, Path] | None = None

    def save_checkpoint(self, *, step: int, folder: Path) -> None:
        import shutil

        shutil.copytree(folder, self.keep)
        self.saved = (step, self.keep)
        raise StopTraining("lease_lost")


class ResumeFrom(NullHooks):
    def __init__(self, found: tuple[int, Path]) -> None:
        super().__init__(report_every=1)
        self.found = found

    def load_checkpoint(self) -> tuple[int, Path] | None:
        return self.found


@pytest.mark.slow
def test_resumed_run_ends_identical_to_an_uninterrupted_one(tiny_cache: Path, tmp_path: Path) -> None:
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2, "alpha": 1, "dropout": 0.1, "targets": "attention+conv+ff"},
        training={
            "max_steps": 4,
            "learning_rate": 1e-3,
            "lr_scheduler": "cosine",
            "warmup_steps": 1,
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "checkpoint_every": 2,
            "seed": 3,
            "random_flip": True,
            "min_snr_gamma": 5.0,
            "noise_offset": 0.05,
        },
    )
    items = items_for_loop()
    full = train_artifact(
        spec=spec,
        base=load_tiny(tiny_cache),
        items=items,
        workdir=tmp_path / "full",
        hooks=NullHooks(report_every=1),
        device=CPU,
    )

    stopper = StopAfterCheckpoint(tmp_path / "kept")
    with pytest.raises(StopTraining):
        train_artifact(
            spec=spec,
            base=load_tiny(tiny_cache),
            items=items,
            workdir=tmp_path / "stopped",
            hooks=stopper,
            device=CPU,
        )
    assert stopper.saved is not None and stopper.saved[0] == 2
    assert checkpoint.read_step(stopper.saved[1]) == 2

    resumed = train_artifact(
        spec=spec,
        base=load_tiny(tiny_cache),
        items=items,
        workdir=tmp_path / "resumed",
        hooks=ResumeFrom(stopper.saved),
        device=CPU,
    )
    assert resumed.resumed_from_step == 2
    assert [step for step, _ in resumed.loss_history] == [3, 4]
    expected = load_file(full.artifact_dir / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed.artifact_dir / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)
    assert math.isclose(resumed.final_loss, full.final_loss, rel_tol=1e-5)


def test_checkpoint_of_another_method_is_refused(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    kwargs = {"optimizer": optimizer, "lr_scheduler": scheduler, "grad_scaler": scaler}
    checkpoint.save_checkpoint(tmp_path / "ck", step=5, method="lora", trainable_state={"p": param}, **kwargs)
    assert checkpoint.load_checkpoint(tmp_path / "ck", method="lora", **kwargs)[0] == 5
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(tmp_path / "ck", method="dreambooth", **kwargs)
    (tmp_path / "ck" / checkpoint.STATE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load_checkpoint(tmp_path / "ck", method="lora", **kwargs)


class Recorder(NullHooks):
    """Reports every third step; records what the loop hands over."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []
        self.reports: list[tuple[int, int, float, float]] = []
        self.checkpoints: list[tuple[int, list[str], bool]] = []
        self.samples: list[tuple[int, list, list[str]]] = []

    def should_report(self, step: int) -> bool:
        self.asked.append(step)
        return step % 3 == 0

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self.reports.append((step, total, loss, images_per_s))

    def save_checkpoint(self, *, step: int, folder: Path) -> None:
        self.checkpoints.append((step, sorted(p.name for p in folder.iterdir()), folder.exists()))

    def save_samples(self, *, step: int, images: list, prompts: list[str]) -> None:
        self.samples.append((step, images, prompts))


def test_hooks_get_throttled_progress_checkpoints_and_samples(tiny_cache: Path, tmp_path: Path) -> None:
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={
            "max_steps": 4,
            "checkpoint_every": 2,
            "sample_every": 2,
            "sample_prompts": ["a photo of sks"],
        },
    )
    hooks = Recorder()
    result = train_artifact(
        spec=spec,
        base=load_tiny(tiny_cache),
        items=items_for_loop(),
        workdir=tmp_path,
        hooks=hooks,
        device=CPU,
    )
    assert hooks.asked == [1, 2, 3]  # the last step always reports, without asking
    assert [(step, total) for step, total, _, _ in hooks.reports] == [(3, 4), (4, 4)]
    assert all(math.isfinite(loss) and rate > 0 for _, _, loss, rate in hooks.reports)
    # The curve has a point every max_steps // 100 steps (here every step); reports are among them.
    assert [step for step, _ in result.loss_history] == [1, 2, 3, 4]
    assert {(step, loss) for step, _, loss, _ in hooks.reports} <= set(result.loss_history)
    # No checkpoint at the last step: the artifact follows at once.
    assert hooks.checkpoints == [(2, [checkpoint.STATE, checkpoint.TENSORS, checkpoint.TRAINING_STATE], True)]
    assert [(step, prompts) for step, _, prompts in hooks.samples] == [
        (2, ["a photo of sks"]),
        (4, ["a photo of sks"]),
    ]
    assert all(image.size == (32, 32) for _, images, _ in hooks.samples for image in images)


def test_gradient_checkpointing_trains_the_same_weights(tiny_cache: Path, tmp_path: Path) -> None:
    weights = []
    for checkpointing in (False, True):
        spec = JobSpec(
            base_model="tiny-sd",
            dataset_id="ds",
            params={"method": "lora", "rank": 2, "train_text_encoder": True},
            training={"max_steps": 2, "learning_rate": 1e-2, "gradient_checkpointing": checkpointing},
        )
        result = train_artifact(
            spec=spec,
            base=load_tiny(tiny_cache),
            items=items_for_loop(),
            workdir=tmp_path / str(checkpointing),
            hooks=NullHooks(),
            device=CPU,
        )
        weights.append(load_file(result.artifact_dir / "pytorch_lora_weights.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


# --- optimizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_each_optimizer_trains_the_adapter(tiny_cache: Path, tmp_path: Path, name: str) -> None:
    base = load_tiny(tiny_cache)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "optimizer": name},
    )
    result = train_artifact(
        spec=spec, base=base, items=items_for_loop(), workdir=tmp_path, hooks=NullHooks(), device=CPU
    )
    assert math.isfinite(result.final_loss)
    lora_b = [v for k, v in base.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # gaussian init starts B at zero
    # Frozen base weights never move, whatever the optimizer (peft keeps them as `base_layer`).
    after = {k.replace(".base_layer.", "."): v for k, v in base.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_8bit_adamw_needs_cuda_and_bitsandbytes(tiny_cache: Path, tmp_path: Path) -> None:
    from core.errors import MethodInputError

    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={"max_steps": 1, "optimizer": "adamw_8bit"},
    )
    with pytest.raises(MethodInputError) as raised:
        train_artifact(
            spec=spec,
            base=load_tiny(tiny_cache),
            items=items_for_loop(),
            workdir=tmp_path,
            hooks=NullHooks(),
            device=CPU,
        )
    assert raised.value.code == "optimizer_unavailable"
