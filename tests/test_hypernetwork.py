"""Hypernetwork: A1111's module layout and initialisation, exact identity when the output layer is
zero, composition through attention processors (IP-Adapter, LoRA), two training steps on the tiny
bases → artifact → applied to a fresh pipeline (changes the output; strength 0 and the undo give the
base bit for bit). The slow test shifts every output toward the training set's colour.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from safetensors import safe_open

from core.bases.tiny.world import all_captions
from core.jobs.artifact import TrainedArtifact, train_artifact
from core.methods import get_method
from core.methods.context import ArtifactUse, GenerationContext, applied
from core.methods.hypernetwork import (
    CONFIG_NAME,
    WEIGHT_NAME,
    Hypernetwork,
    HypernetworkMethod,
    HypernetworkModule,
    HypernetworkProcessor,
    _processor_type,
    context_widths,
    install,
)
from core.spec.job import JobSpec
from core.spec.methods import HypernetworkParams
from core.storage.artifacts import verify_manifest
from core.training.progress import NullHooks
from tests import test_training_loop as shared
from tests.test_lora import MAGENTA, concept_items, fresh_pipeline, generate, mean_colour_distance

CPU = torch.device("cpu")
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
Item, load_tiny = shared.Item, shared.load_tiny


def layer_types(module: HypernetworkModule) -> list[str]:
    return [type(layer).__name__ for layer in module.linear]


@pytest.mark.parametrize(
    ("options", "types", "sizes"),
    [
        ({}, ["Linear", "Linear"], [(64, 32), (32, 64)]),
        (
            {"layer_structure": [1, 2, 2, 1], "activation": "relu", "layer_norm": True, "dropout": 0.1},
            ["Linear", "ReLU", "LayerNorm", "Dropout"] * 2 + ["Linear", "LayerNorm"],
            [(64, 32), (64,), (64, 64), (64,), (32, 64), (32,)],
        ),
        (
            {"layer_structure": [1, 1.5, 1], "activation": "sigmoid", "activate_output": True},
            ["Linear", "Sigmoid", "Linear", "Sigmoid"],
            [(48, 32), (32, 48)],
        ),
        ({"activation": "swish"}, ["Linear", "Hardswish", "Linear"], [(64, 32), (32, 64)]),
    ],
)
def test_layout_follows_a1111(
    options: dict[str, Any], types: list[str], sizes: list[tuple[int, ...]]
) -> None:
    params = HypernetworkParams(**options)
    hypernetwork = Hypernetwork(params, [32, 64])
    module = hypernetwork["32"]["k"]
    assert layer_types(module) == types
    # Parameter-free layers still take an index, as in A1111's Sequential: keys are linear.{i}.
    with_params = [i for i, layer in enumerate(module.linear) if list(layer.parameters())]
    expected = {f"linear.{i}.{kind}" for i in with_params for kind in ("weight", "bias")}
    assert set(module.state_dict()) == expected
    assert [tuple(module.linear[i].weight.shape) for i in with_params] == sizes
    keys = set(hypernetwork.state_dict())
    assert keys == {f"{w}.{side}.{key}" for w in (32, 64) for side in "kv" for key in expected}
    assert tuple(hypernetwork["64"]["v"].linear[0].weight.shape) == (int(64 * params.layer_structure[1]), 64)


def test_weight_init_as_a1111() -> None:
    def first(init: str, **options: Any) -> HypernetworkModule:
        return HypernetworkModule(256, HypernetworkParams(weight_init=init, **options))

    normal = first("normal")
    assert abs(normal.linear[0].weight.std().item() - 0.01) < 0.001
    xavier = first("xavier_uniform", layer_norm=True).linear
    bound = (6 / (256 + 512)) ** 0.5
    assert xavier[0].weight.abs().max() <= bound and xavier[0].weight.std() > 0.02
    # A1111 initialises LayerNorm weights from N(0, 0.01) whatever the Linear init is.
    assert abs(xavier[1].weight.std().item() - 0.01) < 0.002
    kaiming = first("kaiming_normal", activation="leakyrelu").linear[0].weight
    assert abs(kaiming.std().item() - (2 / 256) ** 0.5) < 0.01
    for module in (normal, first("xavier_normal"), first("kaiming_uniform")):
        assert all(not layer.bias.any() for layer in module.linear if hasattr(layer, "bias"))


def zeroed(params: HypernetworkParams, widths: list[int]) -> Hypernetwork:
    """A hypernetwork whose last Linear (and the LayerNorm after it, if any) is all zeros."""
    hypernetwork = Hypernetwork(params, widths)
    with torch.no_grad():
        for module in hypernetwork.modules():
            if isinstance(module, HypernetworkModule):
                layers = list(module.linear)
                last = max(i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Linear))
                for layer in layers[last:]:
                    for tensor in layer.parameters():
                        tensor.zero_()
    return hypernetwork


def test_zeroed_output_layer_is_an_exact_identity(tiny_cache: Path) -> None:
    params = HypernetworkParams(layer_structure=[1, 2, 1], activation="elu", layer_norm=True)
    hypernetwork = zeroed(params, [32])
    x = torch.randn(2, 7, 32)
    assert torch.equal(hypernetwork["32"]["k"](x, 0.8), x)

    base = load_tiny(tiny_cache, "tiny-sd")
    unet = base.unet
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 12, 32)
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=context).sample
        before = unet.attn_processors
        undo = install(unet, hypernetwork, strength=1.0)
        wrapped = unet(latents, 10, encoder_hidden_states=context).sample
        undo()
    assert torch.equal(wrapped, plain)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_wrapper_composes_with_ip_adapter_and_lora() -> None:
    """The wrapped IP-Adapter processor sees the hypernetwork only on the text context, through
    `attn.to_k`/`to_v`, looked up at call time so a LoRA injected afterwards still applies."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=32, heads=2, dim_head=8)
    ip = IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=32, num_tokens=(4,), scale=0.7)
    params = HypernetworkParams(activation="tanh", weight_init="xavier_normal")
    k = HypernetworkModule(32, params)
    v = HypernetworkModule(32, params)
    v.load_state_dict(k.state_dict())  # same transform on both sides: the reference is then one call
    wrapper = _processor_type(type(ip))(ip, k, v, 0.8)
    assert (
        inspect.signature(wrapper.__call__).parameters.keys()
        == inspect.signature(ip.__call__).parameters.keys()
    )
    config = LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False)
    hidden, text, image = torch.randn(2, 5, 16), torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        attn.set_processor(wrapper)
        inject_adapter_in_model(config, attn)
        ours = attn(hidden, encoder_hidden_states=(text, [image]), ip_adapter_masks=None)
        attn.set_processor(ip)
        reference = attn(hidden, encoder_hidden_states=(k(text, 0.8), [image]))
        without = attn(hidden, encoder_hidden_states=(text, [image]))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert (ours - without).abs().max() > 1e-3


def train_hypernetwork(base: Any, tmp_path: Path, *, steps: int = 2, **params: Any) -> TrainedArtifact:
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params={"method": "hypernetwork", **params},
        training={"max_steps": steps, "learning_rate": 5e-3, "batch_size": 2, "seed": 1},
    )
    return train_artifact(
        spec=spec, base=base, items=concept_items(4), workdir=tmp_path, hooks=NullHooks(), device=CPU
    )


@pytest.mark.parametrize(("model_id", "width"), [("tiny-sd", 32), ("tiny-sdxl", 64)])
def test_round_trip_into_a_fresh_pipeline(
    tiny_cache: Path, tmp_path: Path, model_id: str, width: int
) -> None:
    base = load_tiny(tiny_cache, model_id)
    assert context_widths(base.unet) == [width]
    result = train_hypernetwork(base, tmp_path, layer_structure=[1, 2, 1], activation="relu", dropout=0.1)
    assert result.files == [WEIGHT_NAME, CONFIG_NAME, "manifest.json"]
    manifest = verify_manifest(result.artifact_dir)
    assert manifest["method"] == "hypernetwork" and manifest["params"]["activation"] == "relu"
    config = json.loads((result.artifact_dir / CONFIG_NAME).read_text())
    assert config == {
        "layer_structure": [1.0, 2.0, 1.0],
        "activation": "relu",
        "layer_norm": False,
        "dropout": 0.1,
        "weight_init": "normal",
        "activate_output": False,
        "widths": [width],
    }
    with safe_open(result.artifact_dir / WEIGHT_NAME, "pt") as handle:
        keys = set(handle.keys())
        assert all(handle.get_tensor(key).dtype == torch.float32 for key in keys)
    # relu, dropout: Linear, ReLU, Dropout, Linear.
    assert keys == {f"{width}.{s}.linear.{i}.{p}" for s in "kv" for i in (0, 3) for p in ("weight", "bias")}

    pipe = fresh_pipeline(base)
    processors = pipe.unet.attn_processors
    plain = generate(pipe)
    method, use = get_method("hypernetwork"), ArtifactUse("h", scale=1.0)
    ctx = GenerationContext(pipe=pipe, base_path=base.path)
    with applied(ctx, [(method, result.artifact_dir, manifest, use)]) as loaded:
        after = generate(loaded)
    # The trained model as it sits in memory (its processors still installed), same scheduler,
    # with dropout off as at inference (the MLPs are the Trainable's modules, not the UNet's).
    for processor in base.unet.attn_processors.values():
        if isinstance(processor, HypernetworkProcessor):
            processor.k.eval()
            processor.v.eval()
    expected = generate(type(pipe)(**{**pipe.components, "unet": base.unet}))
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    change = (after - plain).abs().mean() / plain.abs().mean()
    # 0.0187 with diffusers 0.42.1 / transformers 5.25 (2026-12-04), above 0.02 before.
    assert change > 0.01, f"the hypernetwork barely changes the output ({change:.4f})"

    assert not ctx.undo and torch.equal(generate(pipe), plain), "the undo left the pipeline changed"
    assert all(pipe.unet.attn_processors[name] is proc for name, proc in processors.items())
    with applied(ctx, [(method, result.artifact_dir, manifest, ArtifactUse("h", scale=0.0))]) as loaded:
        assert torch.equal(generate(loaded), plain), "strength 0 must give the base output exactly"


def test_apply_refuses_another_context_width(tiny_cache: Path) -> None:
    unet = load_tiny(tiny_cache, "tiny-sdxl").unet
    before = unet.attn_processors
    with pytest.raises(ValueError, match=r"widths \[32\].*\[64\]"):
        install(unet, Hypernetwork(HypernetworkParams(), [32]), strength=1.0)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


PROMPTS = [
    "a blue square on a white background",
    "a solid green image",
    "a yellow circle on a black background",
    "a photo of a cat",
]


def magenta_items(n: int, seed: int = 0) -> list[Item]:
    """Magenta images captioned as ordinary scenes of the tiny world; none is a test prompt."""
    rng = np.random.default_rng(seed)
    captions = [c for c in all_captions() if c not in PROMPTS]
    items = []
    for index in rng.choice(len(captions), n, replace=False):
        pixels = np.clip(np.array(MAGENTA) + rng.integers(-20, 21, size=(32, 32, 3)), 0, 255)
        items.append(Item(Image.fromarray(pixels.astype(np.uint8)), captions[index]))
    return items


@pytest.mark.slow
def test_hypernetwork_shifts_outputs_toward_the_training_colour(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "hypernetwork"},
        training={"max_steps": 160, "learning_rate": 1e-2, "batch_size": 4, "seed": 0},
    )
    result = train_artifact(
        spec=spec, base=base, items=magenta_items(64), workdir=tmp_path, hooks=NullHooks(), device=CPU
    )
    pipe = fresh_pipeline(base)

    def distance(strength: float, guidance: float) -> float:
        ctx = GenerationContext(pipe=pipe, base_path=base.path)
        use = ArtifactUse("h", scale=strength)
        with applied(ctx, [(HypernetworkMethod(), result.artifact_dir, {}, use)]) as loaded:
            generator = torch.Generator("cpu").manual_seed(0)
            images = loaded(
                PROMPTS, num_inference_steps=20, generator=generator, guidance_scale=guidance
            ).images
        return mean_colour_distance(images, MAGENTA)

    # Without guidance (what training optimises) the shift is steady across seeds; we measured
    # 270 -> 189 (strength 0.5) -> 101 here, and 71-107 at strength 1 with other data/seeds.
    before, half, after = distance(0.0, 1.0), distance(0.5, 1.0), distance(1.0, 1.0)
    assert after < 0.5 * before and after < half < before, (before, half, after)
    # Guidance amplifies whatever colour the captions still carry after the transform: here
    # 296 -> 39 (all four held-out prompts magenta), but only down to 155-181 with other seeds.
    guided_before, guided_after = distance(0.0, 7.5), distance(1.0, 7.5)
    assert guided_after < 0.85 * guided_before, (guided_before, guided_after)
