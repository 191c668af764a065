"""Exports of hypernetworks, ControlNets and IP-Adapters, each trained two steps through the loop and
taken from the manifest's `exports`:
- hypernetwork `.pt`: loads with `weights_only=True`, holds only plain types, and an independent
  implementation of A1111's forward pass, rebuilt from the file's dict alone, transforms contexts
  exactly as our modules do (three option sets: relu + layer norm + dropout, linear, swish with
  an activated output);
- ControlNet `.safetensors`: diffusers' `ControlNetModel.from_single_file` (local config, nothing
  from a hub) loads the trained tensors, and a ControlNet pipeline with it generates what the
  primary `controlnet/` folder generates (SD and SDXL); shards merge into one file;
- IP-Adapter `.bin`: exactly `image_proj` then `ip_adapter`, loads with `weights_only=True`, and
  `load_ip_adapter` on it generates what the primary `ip_adapter.safetensors` generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from safetensors.torch import load_file

from core.exports import ExportContext
from core.exports.controlnet import export_single_file
from core.exports.ip_adapter import export_bin
from core.jobs.artifact import TrainedArtifact
from core.methods.hypernetwork import Hypernetwork
from core.methods.ip_adapter import WEIGHT_NAME as IP_WEIGHTS
from core.spec.methods import ControlNetParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from core.training.progress import NullHooks
from tests import test_training_loop as shared
from tests.test_controlnet import shape_items, train_controlnet
from tests.test_hypernetwork import train_hypernetwork
from tests.test_ip_adapter import CYAN, MAGENTA, colour_items, train_ip_adapter
from tests.test_ip_adapter import fresh_pipeline as ip_pipeline
from tests.test_ip_adapter import generate as ip_generate

one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
load_tiny, solid = shared.load_tiny, shared.solid
NAME = "atelier"  # the loop's default export stem


def exported(result: TrainedArtifact, format: str) -> Path:
    manifest = verify_manifest(result.artifact_dir)  # the export is hashed like every other file
    assert not manifest.get("export_errors"), manifest["export_errors"]
    files = manifest["exports"][format]
    assert len(files) == 1 and result.exports[format] == files
    return result.artifact_dir / files[0]


# --- hypernetwork ---------------------------------------------------------------------------------

PLAIN = (int, float, str, bool, type(None), torch.Tensor)


def assert_plain(value: Any, where: str = "file") -> None:
    """Only the types a weights_only unpickler (and a reader in any language) can take."""
    if isinstance(value, dict):  # OrderedDict included
        for key, item in value.items():
            assert isinstance(key, int | str), f"{where}: key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert type(value) in PLAIN or isinstance(value, torch.Tensor), f"{where}: {type(value)}"


# A1111's activation names (its `activation_dict`; "swish" is Hardswish, "linear" adds nothing).
A1111_ACTIVATIONS = {
    "linear": None,
    "relu": F.relu,
    "leakyrelu": F.leaky_relu,
    "elu": F.elu,
    "swish": F.hardswish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def a1111_forward(
    state: dict[str, torch.Tensor], options: dict[str, Any], x: torch.Tensor, multiplier: float
) -> torch.Tensor:
    """A1111's `HypernetworkModule.forward` at inference, from the file's dict alone: the Linears
    (2-D weights) in key order; after Linear i its activation unless i is the last Linear and
    `activate_output` is off; then a LayerNorm (the next, 1-D, weight) when `is_layer_norm`;
    dropout is the identity in eval. `x + mlp(x) * multiplier`."""
    names = [key.removesuffix(".weight") for key in state if key.endswith(".weight")]
    linears = [n for n in names if state[f"{n}.weight"].dim() == 2]
    norms = [n for n in names if state[f"{n}.weight"].dim() == 1]
    assert len(linears) == len(options["layer_structure"]) - 1
    assert len(norms) == (len(linears) if options["is_layer_norm"] else 0)
    activation = A1111_ACTIVATIONS[options["activation_func"]]
    h, norms_left = x, list(norms)
    for i, name in enumerate(linears):
        h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
        last = i == len(linears) - 1
        if activation is not None and (not last or options["activate_output"]):
            h = activation(h)
        if options["is_layer_norm"]:
            norm = norms_left.pop(0)
            weight, bias = state[f"{norm}.weight"], state[f"{norm}.bias"]
            h = F.layer_norm(h, weight.shape, weight, bias, eps=1e-5)
    return x + h * multiplier


HYPERNETWORK_OPTIONS = {
    # Four Linears with ReLU, LayerNorm and Dropout between them: keys run to linear.13, so the
    # numeric (not lexical) order matters.
    "relu+layer_norm": (
        {
            "layer_structure": [1, 2, 2, 2, 1],
            "activation": "relu",
            "layer_norm": True,
            "dropout": 0.1,
            "weight_init": "xavier_normal",
        },
        {
            "weight_initialization": "XavierNormal",
            "use_dropout": True,
            "dropout_structure": [0.0, 0.1, 0.1, 0.1, 0.0],
        },
    ),
    "linear": (
        {"layer_structure": [1, 1.5, 1]},
        {"weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0.0, 0.0, 0.0]},
    ),
    "swish+activate_output": (
        {"activation": "swish", "activate_output": True, "weight_init": "kaiming_uniform"},
        {
            "weight_initialization": "KaimingUniform",
            "use_dropout": False,
            "dropout_structure": [0.0, 0.0, 0.0],
        },
    ),
}


@pytest.mark.parametrize("option_set", list(HYPERNETWORK_OPTIONS))
def test_hypernetwork_pt_is_plain_and_a1111_computes_our_transform(
    tiny_cache: Path, tmp_path: Path, option_set: str
) -> None:
    params, expected = HYPERNETWORK_OPTIONS[option_set]
    base = load_tiny(tiny_cache, "tiny-sd")
    result = train_hypernetwork(base, tmp_path, **params)
    path = exported(result, "a1111")
    assert path.name == f"{NAME}.pt"
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert_plain(state)

    widths = [key for key in state if isinstance(key, int)]
    assert widths == [32]  # tiny-sd's context width
    assert state["layer_structure"] == [float(w) for w in params.get("layer_structure", [1, 2, 1])]
    assert state["activation_func"] == params.get("activation", "linear")
    assert state["is_layer_norm"] is params.get("layer_norm", False)
    assert state["activate_output"] is params.get("activate_output", False)
    assert state["last_layer_dropout"] is expected["use_dropout"]
    assert {k: state[k] for k in expected} == expected
    assert state["step"] == 2 and state["name"] == NAME
    assert state["sd_checkpoint_name"] == "tiny-sd" and state["sd_checkpoint"] is None

    ours = Hypernetwork.load(result.artifact_dir).eval()
    torch.manual_seed(0)
    for width in widths:
        pair = state[width]
        # A1111 writes and indexes a (k, v) tuple of state dicts.
        assert isinstance(pair, tuple) and len(pair) == 2
        for side, module_state in zip("kv", pair, strict=True):
            assert list(module_state) == list(ours[str(width)][side].state_dict())
            x = torch.randn(3, 9, width) * 2
            for multiplier in (1.0, 0.6):
                with torch.no_grad():
                    reference = a1111_forward(module_state, state, x, multiplier)
                    transformed = ours[str(width)][side](x, multiplier)
                delta = transformed - x
                assert delta.abs().mean() > 1e-4, "the transform is too close to identity to compare"
                torch.testing.assert_close(reference - x, delta, rtol=1e-5, atol=1e-7)


# --- ControlNet -----------------------------------------------------------------------------------


def control_generate(pipe: Any, prompt: str, image: Any) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(
            prompt, image=image, num_inference_steps=3, generator=generator, output_type="latent"
        ).images


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_controlnet_single_file_loads_back_and_generates_the_same(
    tiny_cache: Path, tmp_path: Path, model_id: str
) -> None:
    base = load_tiny(tiny_cache, model_id)
    items = shape_items(4)
    result = train_controlnet(base, tmp_path, items, NullHooks(), max_steps=2, learning_rate=1e-2)
    path = exported(result, "single_file")
    assert path.name == f"{NAME}.safetensors"
    folder = result.artifact_dir / "controlnet"
    trained = load_file(folder / "diffusion_pytorch_model.safetensors")
    single = load_file(path)
    # The key ComfyUI, sd-webui-controlnet and diffusers detect a diffusers-layout ControlNet by.
    assert "controlnet_cond_embedding.conv_in.weight" in single
    assert single.keys() == trained.keys() and all(torch.equal(single[k], trained[k]) for k in trained)
    assert trained["controlnet_mid_block.weight"].abs().sum() > 0  # trained away from zero

    loaded = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == trained.keys()
    assert all(torch.equal(loaded_state[k], trained[k]) for k in trained)

    cls = StableDiffusionXLControlNetPipeline if base.family == "sdxl" else StableDiffusionControlNetPipeline
    primary = cls.from_pretrained(base.path, controlnet=ControlNetModel.from_pretrained(folder))
    from_file = cls.from_pretrained(base.path, controlnet=loaded)
    for pipe in (primary, from_file):
        pipe.set_progress_bar_config(disable=True)
    prompt, control = items[0].caption, items[1].conditioning
    torch.testing.assert_close(
        control_generate(from_file, prompt, control),
        control_generate(primary, prompt, control),
        rtol=0,
        atol=0,
    )


def test_controlnet_shards_merge_into_one_file(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    folder = tmp_path / "artifact" / "controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ctx = ExportContext(base.path, "tiny-sd", "sd", ControlNetParams(), TrainingParams(), "cn")
    names = export_single_file(tmp_path / "artifact", tmp_path / "out", ctx)
    assert names == ["cn.safetensors"]
    merged = load_file(tmp_path / "out" / names[0])
    state = controlnet.state_dict()
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)


# --- IP-Adapter -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_ip_adapter_bin_loads_back_and_generates_the_same(
    tiny_cache: Path, tmp_path: Path, model_id: str
) -> None:
    base = load_tiny(tiny_cache, model_id)
    result = train_ip_adapter(base, tmp_path, colour_items([MAGENTA, CYAN], 2))
    path = exported(result, "bin")
    assert path.name == f"ip-adapter_{NAME}.bin"

    state = torch.load(path, weights_only=True, map_location="cpu")
    assert list(state) == ["image_proj", "ip_adapter"]
    flat = load_file(result.artifact_dir / IP_WEIGHTS)
    nested = {f"{part}.{key}": tensor for part, inner in state.items() for key, tensor in inner.items()}
    assert nested.keys() == flat.keys() and all(torch.equal(nested[k], flat[k]) for k in flat)
    indices = [int(key.split(".")[0]) for key in state["ip_adapter"]]
    assert indices == sorted(indices) and indices[0] == 1

    reference = solid(MAGENTA)
    outputs = []
    for folder, weight_name in ((result.artifact_dir, IP_WEIGHTS), (path.parent, path.name)):
        pipe = ip_pipeline(base)  # fresh, with the tiny image encoder registered
        plain = ip_generate(pipe)
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
        outputs.append(ip_generate(pipe, ip_adapter_image=reference))
        assert not torch.allclose(outputs[-1], plain), "the adapter did not change the output"
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_ip_adapter_bin_orders_processors_numerically(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    flat = {"image_proj.proj.weight": torch.ones(2, 2), "image_proj.norm.weight": torch.ones(2)}
    for index in (11, 3, 1, 21):
        flat[f"ip_adapter.{index}.to_k_ip.weight"] = torch.full((2, 2), float(index))
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    save_file(flat, artifact / IP_WEIGHTS)
    ctx = ExportContext(tmp_path, "tiny-sd", "sd", None, TrainingParams(), "x")
    (name,) = export_bin(artifact, tmp_path / "out", ctx)
    state = torch.load(tmp_path / "out" / name, weights_only=True)
    assert list(state["ip_adapter"]) == [f"{i}.to_k_ip.weight" for i in (1, 3, 11, 21)]
    assert isinstance(state["image_proj"], dict) and set(state["image_proj"]) == {
        "proj.weight",
        "norm.weight",
    }
