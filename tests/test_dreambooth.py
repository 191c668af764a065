"""DreamBooth: two training steps through the shared loop on the tiny bases, the artifact loaded with
diffusers' own `from_pretrained` into a fresh pipeline, the prior-preservation loss and class-image
cache, apply/undo on a cached pipeline, and (slow) a colour learnt while the class prompt keeps its
look.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from core.jobs.artifact import TrainedArtifact, train_artifact
from core.methods import get_method
from core.methods.base import Trainable
from core.methods.context import ArtifactUse, GenerationContext, applied
from core.methods.dreambooth import (
    CLASS_CHUNK,
    DreamBoothMethod,
    class_images_key,
    save_module,
)
from core.spec.job import JobSpec
from core.spec.methods import DreamBoothParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from core.training.caching import Batch
from core.training.progress import NullHooks
from tests import test_lora as lora
from tests import test_training_loop as shared

CPU = torch.device("cpu")
INSTANCE = "a photo of sks"
# A prompt the tiny world knows (see the slow test for why not "a photo of a <class>").
CLASS = "a solid image"
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
load_tiny, concept_items, fresh_pipeline = shared.load_tiny, lora.concept_items, lora.fresh_pipeline
mean_colour_distance, MAGENTA = lora.mean_colour_distance, lora.MAGENTA


class CachingHooks(NullHooks):
    """A storage-backed cache in miniature: what the worker's hooks do with class images."""

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, list[Any]] = {}
        self.made: list[int] = []
        self.keys: list[str] = []

    def cached_images(self, *, key: str, count: int, make: Callable[[int], list[Any]]) -> list[Any]:
        self.keys.append(key)
        if key not in self.store:
            self.made.append(count)
            self.store[key] = make(count)
        return self.store[key]


def train_dreambooth(
    base: Any,
    workdir: Path,
    *,
    steps: int = 2,
    lr: float = 1e-3,
    hooks: NullHooks | None = None,
    training: dict[str, Any] | None = None,
    **params: Any,
) -> TrainedArtifact:
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params={
            "method": "dreambooth",
            "instance_prompt": INSTANCE,
            "class_prompt": CLASS,
            "num_class_images": 2,
            "class_inference_steps": 2,
            **params,
        },
        training={"max_steps": steps, "learning_rate": lr, "batch_size": 2, "seed": 1, **(training or {})},
    )
    return train_artifact(
        spec=spec, base=base, items=concept_items(3), workdir=workdir, hooks=hooks or NullHooks(), device=CPU
    )


def generate(pipe: Any, prompt: str = INSTANCE) -> torch.Tensor:
    return lora.generate(pipe, prompt)


def trained_names(encoders: bool, family: str) -> tuple[str, ...]:
    if not encoders:
        return ("unet",)
    return ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")


@pytest.mark.parametrize(
    ("model_id", "encoders"), [("tiny-sd", False), ("tiny-sd", True), ("tiny-sdxl", True)]
)
def test_round_trip_through_diffusers_from_pretrained(
    tiny_cache: Path, tmp_path: Path, model_id: str, encoders: bool
) -> None:
    base = load_tiny(tiny_cache, model_id)
    result = train_dreambooth(base, tmp_path, train_text_encoder=encoders)
    names = trained_names(encoders, base.family)
    weights = {"unet": "diffusion_pytorch_model.safetensors"}
    expected = [f"{n}/{f}" for n in names for f in ("config.json", weights.get(n, "model.safetensors"))]
    assert sorted(result.files) == sorted([*expected, "manifest.json"])
    manifest = verify_manifest(result.artifact_dir)
    assert manifest["method"] == "dreambooth" and manifest["params"]["instance_prompt"] == INSTANCE

    pipe = fresh_pipeline(base)
    before = generate(pipe)
    loaded = {"unet": UNet2DConditionModel.from_pretrained(result.artifact_dir / "unet")}
    for name in names[1:]:
        loaded[name] = type(getattr(pipe, name)).from_pretrained(result.artifact_dir / name)
    for name, module in loaded.items():
        trained = getattr(base, name).state_dict()
        assert module.state_dict().keys() == trained.keys(), name
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, trained[key]), f"{name}.{key}"
    after = generate(type(pipe)(**{**pipe.components, **loaded}))
    live = generate(type(pipe)(**{**pipe.components, **{n: getattr(base, n) for n in names}}))
    torch.testing.assert_close(after, live, rtol=0, atol=0)
    change = (after - before).abs().mean() / before.abs().mean()
    assert change > 0.02, f"two steps barely change the output ({change:.4f})"


def test_without_the_text_encoder_only_the_unet_changes(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    encoder = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in base.unet.state_dict().items()}
    train_dreambooth(base, tmp_path)
    assert all(torch.equal(v, encoder[k]) for k, v in base.text_encoder.state_dict().items())
    changed = sum(not torch.equal(v, unet[k]) for k, v in base.unet.state_dict().items())
    assert changed > 0.9 * len(unet), "a full fine-tune moves (nearly) every UNet tensor"


def random_batch(generator: torch.Generator, n: int, size: int = 16, hidden: int = 32) -> Batch:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return Batch(
        latents=randn(n, 4, size, size),
        noise=randn(n, 4, size, size),
        timesteps=torch.randint(0, 1000, (n,), generator=generator),
        encoder_hidden_states=randn(n, 77, hidden),
    )


@pytest.mark.parametrize("prior_size", [16, 8])
def test_loss_is_instance_plus_weighted_prior(tiny_cache: Path, prior_size: int) -> None:
    """Same-size halves share one UNet pass, other sizes take two; either way the loss is
    instance + prior_loss_weight * prior, each the plain denoising loss."""
    base = load_tiny(tiny_cache, "tiny-sd")
    params = DreamBoothParams(instance_prompt=INSTANCE, class_prompt=CLASS, prior_loss_weight=0.3)
    trainable = DreamBoothMethod().build(base, params, TrainingParams(), device=CPU)
    generator = torch.Generator().manual_seed(0)
    instance, prior = random_batch(generator, 2), random_batch(generator, 1, prior_size)
    calls: list[int] = []
    base.unet.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    with torch.no_grad():
        expected = Trainable.forward(trainable, instance) + 0.3 * Trainable.forward(trainable, prior)
        alone = Trainable.forward(trainable, instance)
        calls.clear()
        instance.prior = prior
        loss = trainable(instance)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert calls == ([3] if prior_size == 16 else [2, 1])
    instance.prior = None
    with torch.no_grad():
        torch.testing.assert_close(trainable(instance), alone, rtol=0, atol=0)


def test_prior_batches_are_trained_on(tiny_cache: Path, tmp_path: Path) -> None:
    def unet_after(weight: float) -> dict[str, torch.Tensor]:
        base = load_tiny(tiny_cache, "tiny-sd")
        train_dreambooth(base, tmp_path / str(weight), prior_loss_weight=weight)
        return base.unet.state_dict()

    without, with_prior = unet_after(0.0), unet_after(1.0)
    assert any(not torch.equal(v, with_prior[k]) for k, v in without.items())


def test_class_images_are_made_once_and_cached_under_a_stable_key(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    count = CLASS_CHUNK + 1  # two pipeline calls
    params = DreamBoothParams(
        instance_prompt=INSTANCE, class_prompt=CLASS, num_class_images=count, class_inference_steps=2
    )
    trainable = DreamBoothMethod().build(base, params, TrainingParams(), device=CPU)
    hooks = CachingHooks()
    items = [shared.Item(image.image, "a caption the method ignores") for image in concept_items(3)]
    first = trainable.training_items(items, resolution=32, hooks=hooks)
    second = trainable.training_items(items, resolution=32, hooks=hooks)
    assert hooks.made == [count], "make runs once; the second job gets the stored images"
    assert len(hooks.keys) == 2 and hooks.keys[0] == hooks.keys[1]
    assert len(hooks.keys[0]) == 64 and int(hooks.keys[0], 16) >= 0  # a sha256 hex digest
    assert [item.captions for item in first.items] == [(INSTANCE,)] * 3
    assert first.prior is not None and second.prior is not None
    assert [item.captions for item in first.prior] == [(CLASS,)] * count
    assert [item.image for item in second.prior] == hooks.store[hooks.keys[0]]
    assert all(item.image.size == (32, 32) for item in first.prior)

    # Deterministic: a fresh make gives the same pixels.
    again = trainable.class_images(trainable.pipeline(), count, 32)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b.image)) for a, b in zip(again, first.prior, strict=True)
    )

    # The key names everything the images depend on.
    key = class_images_key(base.fingerprint, params, 32, scheduler="DPMSolverMultistepScheduler")
    assert key == hooks.keys[0]
    variants = [
        class_images_key("other-base", params, 32, scheduler="DPMSolverMultistepScheduler"),
        class_images_key(base.fingerprint, params, 64, scheduler="DPMSolverMultistepScheduler"),
        class_images_key(base.fingerprint, params, 32, scheduler="DDIMScheduler"),
    ]
    for change in (
        {"class_prompt": "a solid red image"},
        {"num_class_images": 3},
        {"class_inference_steps": 3},
    ):
        changed = params.model_copy(update=change)
        variants.append(
            class_images_key(base.fingerprint, changed, 32, scheduler="DPMSolverMultistepScheduler")
        )
    assert len({key, *variants}) == len(variants) + 1


def test_without_prior_preservation_no_class_images(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    params = DreamBoothParams(instance_prompt=INSTANCE, prior_preservation=False)
    trainable = DreamBoothMethod().build(base, params, TrainingParams(), device=CPU)
    hooks = CachingHooks()
    training_set = trainable.training_items(concept_items(3), resolution=32, hooks=hooks)
    assert training_set.prior is None and hooks.keys == []


@pytest.mark.parametrize(("model_id", "encoders"), [("tiny-sd", False), ("tiny-sdxl", True)])
def test_apply_then_undo_leaves_the_cached_pipeline_bit_identical(
    tiny_cache: Path, tmp_path: Path, model_id: str, encoders: bool
) -> None:
    base = load_tiny(tiny_cache, model_id)
    result = train_dreambooth(base, tmp_path, train_text_encoder=encoders)
    manifest = verify_manifest(result.artifact_dir)
    pipe = fresh_pipeline(base)
    originals = {name: getattr(pipe, name) for name in trained_names(True, base.family)}
    plain = generate(pipe)
    ctx = GenerationContext(pipe=pipe, base_path=base.path)
    method = get_method("dreambooth")
    with applied(ctx, [(method, result.artifact_dir, manifest, ArtifactUse("a0"))]) as used:
        swapped = {name for name, module in originals.items() if getattr(used, name) is not module}
        tuned = generate(used)
    assert swapped == set(trained_names(encoders, base.family))
    assert not torch.equal(tuned, plain)
    assert ctx.undo == []
    assert all(getattr(pipe, name) is module for name, module in originals.items())
    assert torch.equal(generate(pipe), plain)


def test_fp16_variant_saves_and_an_fp16_pipeline_loads_it(tiny_cache: Path, tmp_path: Path) -> None:
    """The CUDA-only save path, run on CPU: the fp16 variant beside the fp32 weights, and `apply`
    choosing it for an fp16 pipeline."""
    base = load_tiny(tiny_cache, "tiny-sd")
    artifact = tmp_path / "artifact"
    assert save_module(base.unet, artifact / "unet", fp16_variant=True) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    assert save_module(base.text_encoder, artifact / "text_encoder", fp16_variant=True) == [
        "config.json",
        "model.fp16.safetensors",
        "model.safetensors",
    ]
    half = UNet2DConditionModel.from_pretrained(artifact / "unet", variant="fp16", torch_dtype=torch.float16)
    with safe_open(artifact / "unet" / "diffusion_pytorch_model.fp16.safetensors", "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in list(handle.keys())} == {"F16"}
    for key, tensor in half.state_dict().items():
        assert torch.equal(tensor, base.unet.state_dict()[key].half()), key

    pipe = fresh_pipeline(base).to(torch.float16)
    original = pipe.unet
    ctx = GenerationContext(pipe=pipe, base_path=base.path)
    DreamBoothMethod().apply(ctx, artifact, {}, ArtifactUse("a0"))
    assert pipe.unet is not original and pipe.unet.dtype == torch.float16
    assert torch.equal(pipe.unet.conv_in.weight, half.conv_in.weight)
    ctx.undo.pop()()
    assert pipe.unet is original


def rgb_means(images: list[Image.Image]) -> np.ndarray:
    return np.stack([lora.mean_rgb(image) for image in images])


@pytest.mark.slow
def test_dreambooth_learns_a_colour_and_the_prior_keeps_the_class(tiny_cache: Path, tmp_path: Path) -> None:
    """ "a photo of sks" learns magenta; with prior preservation the class prompt keeps making what
    the base made, without it the class drifts to magenta too (the control run).

    The class prompt is one the tiny world knows. The tiny base was pre-trained so that unknown
    words mean nothing, so "a photo of a dog" and "a photo of sks" reach the frozen tiny encoder as
    nearly the same prompt: separating them takes far more than tens of seconds."""

    def images(pipe: Any, prompt: str) -> list[Image.Image]:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe([prompt] * 8, num_inference_steps=20, generator=generator).images

    def run(prior: bool) -> tuple[list[Image.Image], list[Image.Image]]:
        base = load_tiny(tiny_cache, "tiny-sd")
        result = train_dreambooth(
            base,
            tmp_path / str(prior),
            steps=100,
            lr=3e-4,
            training={"batch_size": 4, "seed": 0, "random_flip": True},
            prior_preservation=prior,
            num_class_images=8,
            class_inference_steps=20,
        )
        pipe = fresh_pipeline(base)
        pipe.register_modules(unet=UNet2DConditionModel.from_pretrained(result.artifact_dir / "unet"))
        return images(pipe, INSTANCE), images(pipe, CLASS)

    pipe = fresh_pipeline(load_tiny(tiny_cache, "tiny-sd"))
    base_instance, base_class = images(pipe, INSTANCE), images(pipe, CLASS)
    instance, kept = run(prior=True)
    _, drifted = run(prior=False)

    before, after = mean_colour_distance(base_instance, MAGENTA), mean_colour_distance(instance, MAGENTA)
    assert after < 0.6 * before and after < 110.0, (before, after)
    # Distance to magenta of the class prompt's images: the base's, kept with the prior, lost without.
    base_d, kept_d, drifted_d = (mean_colour_distance(x, MAGENTA) for x in (base_class, kept, drifted))
    assert kept_d > 0.75 * base_d, (base_d, kept_d)
    # 0.57 with diffusers 0.42.1 / transformers 5.25 (2026-12-04), below 0.5 before.
    assert drifted_d < 0.65 * base_d, (base_d, drifted_d)
    # Image by image (same seeds) the class prompt stays much nearer the base's output with the prior.
    kept_shift = np.linalg.norm(rgb_means(kept) - rgb_means(base_class), axis=1).mean()
    drifted_shift = np.linalg.norm(rgb_means(drifted) - rgb_means(base_class), axis=1).mean()
    assert kept_shift < 0.7 * drifted_shift, (kept_shift, drifted_shift)
