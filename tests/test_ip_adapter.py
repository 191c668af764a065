"""IP-Adapter: train on the tiny bases through the shared loop, load the artifact with diffusers'
own `load_ip_adapter` into a fresh pipeline, and prove it is the trained model; apply + undo leaves
the cached pipeline bit-identical. The slow test makes the generated colour follow the reference's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from core.errors import MethodInputError
from core.jobs.artifact import TrainedArtifact, train_artifact
from core.methods import get_method
from core.methods.context import ArtifactUse, GenerationContext, applied
from core.methods.ip_adapter import WEIGHT_NAME, IPAdapterMethod
from core.spec.job import JobSpec
from core.spec.methods import IPAdapterParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from core.training.caching import Batch
from core.training.progress import NullHooks
from tests import test_training_loop as shared

CPU = torch.device("cpu")
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
Item, load_tiny, solid = shared.Item, shared.load_tiny, shared.solid


def colour_items(colours: list[tuple[int, int, int]], per_colour: int, seed: int = 0) -> list[Any]:
    """Near-solid images of each colour, all with the same neutral caption: only the image tells
    the colour."""
    rng = np.random.default_rng(seed)
    items = []
    for colour in colours:
        for _ in range(per_colour):
            noise = rng.integers(-12, 13, size=(32, 32, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            items.append(Item(Image.fromarray(pixels), "a picture"))
    return items


def train_ip_adapter(
    base: Any, tmp_path: Path, items: list[Any], *, steps: int = 2, lr: float = 1e-3, **training: Any
) -> TrainedArtifact:
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params={"method": "ip_adapter"},
        training={"max_steps": steps, "learning_rate": lr, "batch_size": 2, "seed": 1, **training},
    )
    return train_artifact(spec=spec, base=base, items=items, workdir=tmp_path, hooks=NullHooks(), device=CPU)


def fresh_pipeline(base: Any) -> Any:
    """A plain diffusers pipeline from the base folder, with the base's image encoder."""
    cls = StableDiffusionXLPipeline if base.family == "sdxl" else StableDiffusionPipeline
    encoder = CLIPVisionModelWithProjection.from_pretrained(base.image_encoder_path)
    pipe = cls.from_pretrained(base.path, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, steps: int = 3, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(
            "a picture", num_inference_steps=steps, generator=generator, output_type="latent", **kwargs
        ).images


def artifact_tensors(artifact_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(artifact_dir / WEIGHT_NAME, "pt") as handle:
        metadata = handle.metadata()
    return load_file(artifact_dir / WEIGHT_NAME), metadata


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_round_trip_through_load_ip_adapter(tiny_cache: Path, tmp_path: Path, model_id: str) -> None:
    base = load_tiny(tiny_cache, model_id)
    # Samples at the end exercise `sample` (the reference is a training image).
    result = train_ip_adapter(base, tmp_path, colour_items([MAGENTA, CYAN], 2), sample_prompts=["a"])
    assert result.files == [WEIGHT_NAME, "manifest.json"]
    manifest = verify_manifest(result.artifact_dir)
    assert manifest["method"] == "ip_adapter" and manifest["params"]["num_tokens"] == 4

    tensors, metadata = artifact_tensors(result.artifact_dir)
    cross = base.unet.config.cross_attention_dim  # 32 (SD) / 64 (SDXL)
    # Four cross-attention layers (down 1, up 0 twice, mid), each after its self-attention.
    expected = {f"image_proj.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    expected |= {f"ip_adapter.{i}.to_{kv}_ip.weight" for i in (1, 3, 5, 7) for kv in "kv"}
    assert set(tensors) == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["image_proj.proj.weight"].shape == (4 * cross, 32)
    assert tensors["ip_adapter.1.to_k_ip.weight"].shape == (32, cross)
    # Started from the layer's to_k, and trained away from it.
    to_k = base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    difference = (tensors["ip_adapter.1.to_k_ip.weight"] - to_k).abs().max().item()
    assert 0 < difference < 0.1
    encoder = json.loads(metadata["image_encoder"])
    assert encoder["folder"] == f"{model_id}/image_encoder"
    assert encoder["projection_dim"] == 32 and encoder["hidden_size"] == 32

    reference = solid(MAGENTA)
    pipe = fresh_pipeline(base)
    plain = generate(pipe)
    pipe.load_ip_adapter(
        str(result.artifact_dir), subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None
    )
    loaded = generate(pipe, ip_adapter_image=reference)
    # The trained model as it sits in memory (same processors and projection, trained weights).
    live = {name: getattr(base, name) for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    live = {name: module for name, module in live.items() if name in pipe.components}
    expected_out = generate(type(pipe)(**{**pipe.components, **live}), ip_adapter_image=reference)
    torch.testing.assert_close(loaded, expected_out, rtol=1e-4, atol=1e-5)
    change = (loaded - plain).abs().mean() / plain.abs().mean()
    assert change > 0.02, f"the IP-Adapter barely changes the output ({change:.4f})"


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_apply_and_undo_leave_the_pipeline_bit_identical(
    tiny_cache: Path, tmp_path: Path, model_id: str
) -> None:
    base = load_tiny(tiny_cache, model_id)
    result = train_ip_adapter(base, tmp_path, colour_items([MAGENTA, CYAN], 2), steps=1)
    cls = StableDiffusionXLPipeline if base.family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(base.path)  # no image encoder: apply loads it
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe)
    processors = dict(pipe.unet.attn_processors)
    config = dict(pipe.config)
    ctx = GenerationContext(pipe=pipe, base_path=base.path, image_encoder_path=base.image_encoder_path)
    method, manifest = get_method("ip_adapter"), verify_manifest(result.artifact_dir)
    with applied(ctx, [(method, result.artifact_dir, manifest, ArtifactUse("a0", 0.7, solid(CYAN)))]) as p:
        assert p.image_encoder is not None and p.feature_extractor.crop_size["height"] == 32
        assert ctx.call_kwargs["ip_adapter_image"] is not None
        guided = generate(p, **ctx.call_kwargs)
    assert not torch.equal(guided, plain)
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert dict(pipe.config) == config and not ctx.call_kwargs
    assert torch.equal(generate(pipe), plain)


def test_apply_refuses_an_encoder_of_another_width(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    result = train_ip_adapter(base, tmp_path, colour_items([MAGENTA], 2), steps=1)
    pipe = fresh_pipeline(base)
    config = copy.deepcopy(pipe.image_encoder.config)
    config.projection_dim = 16
    other = CLIPVisionModelWithProjection(config)
    pipe.register_modules(image_encoder=other)
    processors = dict(pipe.unet.attn_processors)
    ctx = GenerationContext(pipe=pipe, base_path=base.path, image_encoder_path=base.image_encoder_path)
    uses = [(get_method("ip_adapter"), result.artifact_dir, {}, ArtifactUse("a0", 1.0, solid(CYAN)))]
    with pytest.raises(MethodInputError) as raised, applied(ctx, uses):
        pass
    assert raised.value.code == "image_encoder_mismatch"
    assert pipe.image_encoder is other and pipe.unet.encoder_hid_proj is None
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_missing_image_encoder_fails_the_job(tiny_cache: Path) -> None:
    base = dataclasses.replace(load_tiny(tiny_cache, "tiny-sd"), image_encoder_path=None)
    with pytest.raises(MethodInputError) as raised:
        IPAdapterMethod().build(base, IPAdapterParams(), TrainingParams(), device=CPU)
    assert raised.value.code == "image_encoder_missing" and "ATELIER_IMAGE_ENCODER" in str(raised.value)
    assert not any(k.endswith("to_k_ip") for k, _ in base.unet.named_modules())


def test_guidance_dropout_per_sample(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sdxl")
    trainable = IPAdapterMethod().build(base, IPAdapterParams(), TrainingParams(), device=CPU)
    n = 4
    batch = Batch(
        latents=torch.zeros(n, 4, 16, 16),
        noise=torch.zeros(n, 4, 16, 16),
        timesteps=torch.zeros(n, dtype=torch.long),
        uncond_hidden_states=torch.full((1, 5, 64), -1.0),
        uncond_pooled_embeds=torch.full((1, 32), -1.0),
        drop=torch.tensor([0.01, 0.07, 0.12, 0.5]),  # image, text, both, nothing (rates 0.05 each)
    )
    pooled = torch.ones(n, 32)
    embeds, hidden, added = trainable._dropout(
        batch, torch.ones(n, 32), torch.ones(n, 5, 64), {"text_embeds": pooled, "time_ids": None}
    )
    assert embeds[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert hidden[:, 0, 0].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert added["text_embeds"][:, 0].tolist() == [1.0, -1.0, -1.0, 1.0]


def mean_rgb(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32).reshape(-1, 3).mean(axis=0) for i in images])


def distance(images: list[Image.Image], target: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(mean_rgb(images) - np.array(target, dtype=np.float32), axis=1).mean())


def is_like(image_means: np.ndarray, low: int) -> bool:
    """Every image's channel `low` is far below the other two (magenta: green; cyan: red)."""
    others = np.delete(image_means, low, axis=1).min(axis=1)
    return bool((image_means[:, low] < 0.5 * others).all())


@pytest.mark.slow
def test_generated_colour_follows_the_reference(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    items = colour_items([MAGENTA, CYAN, (255, 255, 0), (0, 0, 255)], 2)
    # Batch 4 or a constant lr left the cyan reference's outputs too red for some seeds. On the
    # shipped tiny-sd, seed 0: 200 steps pass every check below; 400 steps (what the Intel-built
    # base needed before the bases shipped) overshoot: the magenta reference's images turn red,
    # mean ~[240, 3, 65], 191 from magenta against the base's 235.
    result = train_ip_adapter(
        base, tmp_path, items, steps=200, lr=2e-3, batch_size=8, lr_scheduler="cosine", seed=0
    )
    pipe = fresh_pipeline(base)

    def images(**kwargs: Any) -> list[Image.Image]:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(["a picture"] * 4, num_inference_steps=20, generator=generator, **kwargs).images

    plain = images()
    ctx = GenerationContext(pipe, base.path, base.image_encoder_path)
    get_method("ip_adapter").apply(ctx, result.artifact_dir, {}, ArtifactUse("a0", 1.0, solid(MAGENTA)))
    magenta, cyan = images(ip_adapter_image=solid(MAGENTA)), images(ip_adapter_image=solid(CYAN))
    for undo in reversed(ctx.undo):
        undo()
    distances = {
        "magenta ref": (distance(magenta, MAGENTA), distance(magenta, CYAN)),
        "cyan ref": (distance(cyan, MAGENTA), distance(cyan, CYAN)),
        "base": (distance(plain, MAGENTA), distance(plain, CYAN)),
    }
    # Measured on the shipped tiny-sd (to magenta, to cyan): magenta ref (82, 349), cyan ref
    # (245, 118), base (235, 358); mean colours magenta ref ~[232, 6, 176], cyan ref ~[67, 158, 252].
    assert distances["magenta ref"][0] < distances["cyan ref"][0], distances
    assert distances["cyan ref"][1] < distances["magenta ref"][1], distances
    assert distances["magenta ref"][0] < 0.5 * distances["base"][0], distances
    assert distances["cyan ref"][1] < 0.5 * distances["base"][1], distances
    # Every image follows its reference; the base makes neither colour.
    assert is_like(mean_rgb(magenta), low=1) and is_like(mean_rgb(cyan), low=0), distances
    assert not is_like(mean_rgb(plain), low=1) and not is_like(mean_rgb(plain), low=0)
