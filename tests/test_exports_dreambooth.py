"""DreamBooth single-file export: the trained artifact, taken from the manifest's `exports`, goes back
through diffusers' `from_single_file` with the base's LOCAL folder as `config=` (no hub: sockets are
closed during the load) and every UNet / VAE / text-encoder tensor equals the primary artifact's
(or the base's, for parts that did not train), and the pipeline generates what the base pipeline
with the artifact's folders swapped in generates.

tiny-sdxl caveat (a diffusers limitation, not the file): `from_single_file` picks the converter for
`text_encoder_2` by comparing widths, taking the CLIP-L branch whenever the CLIP-L's position
embedding is as wide as the second encoder. On real SDXL they differ (768 vs 1280); on tiny-sdxl both
are 32, so it would load the CLIP-L weights into `text_encoder_2`. That test therefore converts
`conditioner.embedders.1.model.*` with diffusers' own `convert_open_clip_checkpoint` (the function
the width check leads to on real SDXL) and passes it in. The synthetic real-shaped bases below (SD1.5
and SDXL block structure, distinct encoder widths, VAE mid attention, several layers per block,
linear projections, two transformer layers) load with nothing passed in, and diffusers' own model
detection recognises the exports as v1 / v2 / xl_base.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from core.bases.tiny import shipped_folder
from core.exports import ExportContext
from core.exports.dreambooth import export_single_file
from core.exports.ldm_layout import SDXL_OPEN_CLIP_PREFIX
from core.methods.dreambooth import save_module
from core.spec.methods import DreamBoothParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from tests import test_training_loop as shared
from tests.test_dreambooth import INSTANCE, fresh_pipeline, generate, train_dreambooth, trained_names

one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
load_tiny = shared.load_tiny
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach a hub during the load fails the test."""

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("from_single_file tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def load_single_file(path: Path, config: Path, family: str, **components: Any) -> Any:
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_tensors(loaded: Any, expected: Any, names: tuple[str, ...] = MODULES) -> None:
    for name in names:
        want = getattr(expected, name, None)
        if want is None:
            continue
        got = getattr(loaded, name).state_dict()
        assert got.keys() == want.state_dict().keys(), name
        for key, tensor in want.state_dict().items():
            assert got[key].device.type != "meta", f"{name}.{key} was never loaded"
            assert torch.equal(got[key], tensor), f"{name}.{key}"


def ctx_for(base_path: Path, family: str, name: str = "db-export") -> ExportContext:
    params = DreamBoothParams(instance_prompt=INSTANCE, prior_preservation=False)
    return ExportContext(base_path, "synthetic", family, params, TrainingParams(), name)


# --- the trained tiny bases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "encoders"), [("tiny-sd", False), ("tiny-sd", True), ("tiny-sdxl", True)]
)
def test_trained_export_loads_with_from_single_file_and_generates_the_same(
    tiny_cache: Path, tmp_path: Path, offline: None, model_id: str, encoders: bool
) -> None:
    base = load_tiny(tiny_cache, model_id)
    result = train_dreambooth(base, tmp_path, train_text_encoder=encoders, prior_preservation=False)
    manifest = verify_manifest(result.artifact_dir)
    assert not manifest.get("export_errors"), manifest["export_errors"]
    (file,) = manifest["exports"]["single_file"]
    assert file.startswith("exports/single_file/") and file.endswith(".safetensors")
    assert file in {entry["name"] for entry in manifest["files"]}  # hashed like the primary files
    path = result.artifact_dir / file

    # The primary format in a fresh pipeline: the base with the artifact's folders swapped in.
    primary = fresh_pipeline(base)
    plain = generate(primary)
    trained = trained_names(encoders, base.family)
    swapped = {"unet": UNet2DConditionModel.from_pretrained(result.artifact_dir / "unet")}
    for name in trained[1:]:
        swapped[name] = type(getattr(primary, name)).from_pretrained(result.artifact_dir / name)
    primary.register_modules(**swapped)

    components = {}
    if base.family == "sdxl":  # see the module docstring: tiny-sdxl's encoders are equally wide
        text_encoder_2 = type(primary.text_encoder_2)(primary.text_encoder_2.config)
        state = convert_open_clip_checkpoint(text_encoder_2, load_file(path), prefix=SDXL_OPEN_CLIP_PREFIX)
        assert text_encoder_2.load_state_dict(state, strict=True)
        components["text_encoder_2"] = text_encoder_2.eval()
    loaded = load_single_file(path, base.path, base.family, **components)

    assert_same_tensors(loaded, primary)
    assert type(loaded.scheduler) is type(primary.scheduler)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    expected = generate(primary)
    torch.testing.assert_close(generate(loaded), expected, rtol=0, atol=1e-6)
    change = (expected - plain).abs().mean() / plain.abs().mean()
    assert change > 0.02, f"the trained weights are not what was exported ({change:.4f})"


def test_metadata_names_the_architecture_and_hashes_the_tensors(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sdxl")
    (name,) = export_single_file(Path(base.path), tmp_path, ctx_for(Path(base.path), "sdxl", "my-run"))
    assert name == "my-run.safetensors"
    with safe_open(tmp_path / name, "pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("v_pred").numel() == 0  # ComfyUI's v-prediction marker
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.title"] == "my-run"
    assert metadata["modelspec.resolution"] == "32x32"
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["modelspec.trigger_phrase"] == INSTANCE
    assert metadata["modelspec.date"][:4].isdigit() and "T" in metadata["modelspec.date"]
    raw = (tmp_path / name).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + header :]).hexdigest()


def test_an_fp16_artifact_exports_fp16(tiny_cache: Path, tmp_path: Path, offline: None) -> None:
    """A CUDA run saves the fp16 variant; the export is then all fp16 (half the download), equal to
    that variant, with the base's VAE and encoders cast alike."""
    base = load_tiny(tiny_cache, "tiny-sd")
    artifact = tmp_path / "artifact"
    save_module(base.unet, artifact / "unet", fp16_variant=True)
    (name,) = export_single_file(artifact, tmp_path / "out", ctx_for(Path(base.path), "sd"))
    path = tmp_path / "out" / name
    with safe_open(path, "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in list(handle.keys())} == {"F16"}
    loaded = load_single_file(path, base.path, "sd", torch_dtype=torch.float16)
    half = fresh_pipeline(base).to(torch.float16)
    half.register_modules(
        unet=UNet2DConditionModel.from_pretrained(
            artifact / "unet", variant="fp16", torch_dtype=torch.float16
        )
    )
    assert_same_tensors(loaded, half)


# --- real-shaped synthetic bases: the mapping is generic over the configs ---------------------------


def clip(width: int, layers: int, projection: int | None = None) -> Any:
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or width,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def synthetic_base(tiny_cache: Path, folder: Path, kind: str) -> tuple[Path, str]:
    """A random-weight pipeline folder with the block structure of SD1.5 (four levels, attention
    on the first three), SD2 (the same with an OpenCLIP-H-wide encoder) or SDXL (three levels,
    attention on the last two, two transformer layers deep at the bottom, text_time embedding),
    at tiny widths; tokenizers and scheduler from the tiny base."""
    family = "sdxl" if kind == "sdxl" else "sd"
    template = shipped_folder("tiny-sdxl" if family == "sdxl" else "tiny-sd")
    for part in ("scheduler", "tokenizer", "tokenizer_2", "model_index.json"):
        if (template / part).is_dir():
            shutil.copytree(template / part, folder / part)
        elif (template / part).is_file():
            shutil.copyfile(template / part, folder / part)
    torch.manual_seed(0)
    unet: dict[str, Any] = {
        "sample_size": 8,
        "norm_num_groups": 4,
        "layers_per_block": 2,
        "attention_head_dim": 2,
    }
    if family == "sdxl":
        encoders = {"text_encoder": clip(32, 2), "text_encoder_2": clip(48, 10, projection=40)}
        unet |= {
            "block_out_channels": (8, 16, 32),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1, 2),
            "use_linear_projection": True,
            "cross_attention_dim": 32 + 48,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 40 + 6 * 8,  # pooled projection + 6 size ids
        }
    else:
        width = 1024 if kind == "sd2" else 32
        encoders = {"text_encoder": clip(width, 2)}
        unet |= {
            "block_out_channels": (8, 16, 32, 32),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": width,
            "use_linear_projection": kind == "sd2",
        }
    UNet2DConditionModel(**unet).save_pretrained(folder / "unet")
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(folder / "vae")
    for name, model in encoders.items():
        model.save_pretrained(folder / name)
    return folder, family


# Original names at SD1.5's / SDXL's block structure (the facts A1111 and ComfyUI build their modules
# from; diffusers' loader is lenient about some, e.g. where an upsampler sits behind a transformer).
UNET_SD1 = {
    "present": [
        "time_embed.2.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.6.0.op.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "out.2.weight",
    ],
    "absent": [
        "input_blocks.10.1.proj_in.weight",
        "input_blocks.12.0.in_layers.0.weight",
        "output_blocks.12.0.in_layers.0.weight",
    ],
}
UNET_SDXL = {
    "present": [
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.6.0.op.weight",
        "input_blocks.7.1.transformer_blocks.1.ff.net.2.weight",
        "input_blocks.8.1.proj_out.weight",
        "middle_block.1.proj_in.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
    ],
    "absent": [
        "input_blocks.1.1.proj_in.weight",
        "output_blocks.6.1.proj_in.weight",
        "output_blocks.9.0.in_layers.0.weight",
    ],
}
VAE = {
    "present": [
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.downsample.conv.weight",
        "encoder.mid.block_2.norm2.weight",
        "encoder.norm_out.bias",
        "decoder.up.2.upsample.conv.weight",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.mid.attn_1.norm.weight",
        "post_quant_conv.weight",
    ],
    "absent": ["encoder.down.2.downsample.conv.weight", "decoder.up.0.upsample.conv.weight"],
}
TEXT = {
    "sd1": [
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
    "sd2": [
        "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.bias",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.ln_final.weight",
    ],
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_bias",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.text_projection",
    ],
}
ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}


@pytest.mark.parametrize(("kind", "detected"), [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_real_shaped_bases_load_unassisted(
    tiny_cache: Path, tmp_path: Path, offline: None, kind: str, detected: str
) -> None:
    folder, family = synthetic_base(tiny_cache, tmp_path / "base", kind)
    (name,) = export_single_file(folder, tmp_path / "out", ctx_for(folder, family))
    path = tmp_path / "out" / name
    checkpoint = load_file(path)
    with safe_open(path, "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == ARCHITECTURES[kind]

    assert infer_diffusers_model_type(checkpoint) == detected
    if kind != "sdxl":  # the key diffusers takes as SD1's signature
        assert CHECKPOINT_KEY_NAMES["v1"] in checkpoint
    unet = UNET_SDXL if kind == "sdxl" else UNET_SD1
    for table, prefix in ((unet, "model.diffusion_model."), (VAE, "first_stage_model.")):
        assert [key for key in table["present"] if prefix + key not in checkpoint] == []
        assert [key for key in table["absent"] if prefix + key in checkpoint] == []
    assert [key for key in TEXT[kind] if key not in checkpoint] == []
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.proj_out.weight"].ndim == 4
    if kind == "sd2":
        assert checkpoint["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
            3072,
            1024,
        )
    if kind == "sdxl":
        # (width, projection): OpenCLIP computes x @ P where transformers has Linear(width -> projection)
        assert checkpoint["conditioner.embedders.1.model.text_projection"].shape == (48, 40)

    expected = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(
        folder
    )
    assert_same_tensors(load_single_file(path, folder, family), expected)


def test_a_tensor_the_layout_does_not_cover_fails_the_export(tiny_cache: Path, tmp_path: Path) -> None:
    """A base with a mid block the original layout lacks would lose weights silently in non-strict
    loaders; the export refuses instead (the loop records it in `export_errors`)."""
    base = Path(load_tiny(tiny_cache, "tiny-sd").path)
    artifact = tmp_path / "artifact"
    config = json.loads((base / "unet" / "config.json").read_text()) | {"mid_block_type": "UNetMidBlock2D"}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    UNet2DConditionModel(**config).save_pretrained(artifact / "unet")
    with pytest.raises(ValueError, match="no original-layout name"):
        export_single_file(artifact, tmp_path / "out", ctx_for(base, "sd"))
