"""DreamBooth → one single-file checkpoint (`<name>.safetensors`) in the original Stable Diffusion
key layout: what A1111 / ComfyUI / Forge put in `models/Stable-diffusion`, and what diffusers'
`StableDiffusionPipeline.from_single_file` / `StableDiffusionXLPipeline.from_single_file` load.

The trained UNet (and text encoders, when they trained) come from the artifact; the VAE and untouched
encoders from the base's folder. Names are mapped by core/exports/ldm_layout.py. Weights are fp16
when the artifact carries the fp16 variant (a CUDA run: what people serve, half the download), else
in the UNet's own dtype, so the file reproduces the artifact exactly. `modelspec.*` metadata names
the architecture so UIs classify the file; v-prediction bases also get the empty `v_pred` tensor
ComfyUI looks for (diffusers takes the scheduler from the config folder it is given).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.exports import ldm_layout

STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names
HASH_PLACEHOLDER = "0x" + "0" * 64
IMPLEMENTATIONS = {
    "stable-diffusion-v1": "https://github.com/CompVis/stable-diffusion",
    "stable-diffusion-v2": "https://github.com/Stability-AI/stablediffusion",
    "stable-diffusion-xl": "https://github.com/Stability-AI/generative-models",
}
OPEN_CLIP_H_WIDTH = 1024  # SD 2.x's text encoder; diffusers tells v1 from v2 by the same width


def export_single_file(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    base = Path(ctx.base_path)
    unet_dir = artifact_dir / "unet"
    half = any(unet_dir.glob("*.fp16.safetensors"))
    state = ldm_layout.unet_to_ldm(read_weights(unet_dir, half=half), read_config(unet_dir))
    dtype = torch.float16 if half else next(iter(state.values())).dtype
    state |= ldm_layout.vae_to_ldm(read_weights(base / "vae", half=half), read_config(base / "vae"))

    def encoder(name: str) -> dict[str, torch.Tensor]:
        folder = artifact_dir / name if (artifact_dir / name).is_dir() else base / name
        return read_weights(folder, half=half)

    if ctx.family == "sdxl":
        state |= ldm_layout.clip_to_ldm(encoder("text_encoder"), ldm_layout.SDXL_CLIP_PREFIX)
        state |= ldm_layout.open_clip_to_ldm(encoder("text_encoder_2"), ldm_layout.SDXL_OPEN_CLIP_PREFIX)
    elif is_sd2(base):
        state |= ldm_layout.open_clip_to_ldm(encoder("text_encoder"), ldm_layout.SD2_OPEN_CLIP_PREFIX)
    else:
        state |= ldm_layout.clip_to_ldm(encoder("text_encoder"), ldm_layout.SD1_CLIP_PREFIX)
    prediction = prediction_type(base)
    if prediction == "v":
        state["v_pred"] = torch.zeros(0)
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{ctx.name}.safetensors"
    save_file(state, out_dir / name, metadata=modelspec(ctx, base, unet_dir, prediction))
    del state
    write_content_hash(out_dir / name)
    return [name]


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def read_weights(folder: Path, *, half: bool) -> dict[str, torch.Tensor]:
    """A saved model's tensors: the fp16 variant when `half` and present, shards merged."""
    variants = ("fp16", None) if half else (None,)
    for variant in variants:
        for stem in STEMS:
            suffix = f".{variant}" if variant else ""
            single = folder / f"{stem}{suffix}.safetensors"
            if single.is_file():
                return load_file(single)
            index = folder / f"{stem}.safetensors.index{suffix}.json"
            if index.is_file():
                merged: dict[str, torch.Tensor] = {}
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    merged |= load_file(folder / shard)
                return merged
    raise FileNotFoundError(f"no safetensors weights in {folder}")


def is_sd2(base: Path) -> bool:
    return read_config(base / "text_encoder").get("hidden_size") == OPEN_CLIP_H_WIDTH


def prediction_type(base: Path) -> str:
    """ModelSpec's spelling of the base scheduler's target: `epsilon` or `v`."""
    scheduler = base / "scheduler" / "scheduler_config.json"
    configured = json.loads(scheduler.read_text()).get("prediction_type") if scheduler.is_file() else None
    return "v" if configured == "v_prediction" else "epsilon"


def native_resolution(base: Path, unet_dir: Path) -> int:
    # Each VAE level after the first halves the image.
    levels = len(read_config(base / "vae")["block_out_channels"])
    return int(read_config(unet_dir)["sample_size"]) * 2 ** (levels - 1)


def architecture(ctx: Any, base: Path, resolution: int, prediction: str) -> str:
    if ctx.family == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if is_sd2(base):
        return (
            "stable-diffusion-v2-768-v"
            if prediction == "v" and resolution >= 768
            else "stable-diffusion-v2-512"
        )
    return "stable-diffusion-v1"


def modelspec(ctx: Any, base: Path, unet_dir: Path, prediction: str) -> dict[str, str]:
    """SAI ModelSpec 1.0.0 keys (github.com/Stability-AI/ModelSpec); values are strings."""
    resolution = getattr(ctx.training, "resolution", None) or native_resolution(base, unet_dir)
    arch = architecture(ctx, base, resolution, prediction)
    implementation = next(url for prefix, url in IMPLEMENTATIONS.items() if arch.startswith(prefix))
    instance_prompt = getattr(ctx.params, "instance_prompt", None)
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": implementation,
        "modelspec.title": ctx.name,
        "modelspec.description": f"DreamBooth fine-tune of {ctx.base_model}",
        "modelspec.date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction,
        "modelspec.hash_sha256": HASH_PLACEHOLDER,
        "format": "pt",
    }
    if instance_prompt:
        spec["modelspec.trigger_phrase"] = instance_prompt
        spec["modelspec.usage_hint"] = f"Prompt with: {instance_prompt}"
    return spec


def write_content_hash(path: Path) -> None:
    """ModelSpec's `hash_sha256`: sha256 of the tensor bytes after the header. The header was written
    with a same-length placeholder, so the digest is patched in place without rewriting the data."""
    with path.open("r+b") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = handle.read(header_size)
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
        patched = header.replace(HASH_PLACEHOLDER.encode(), f"0x{digest.hexdigest()}".encode(), 1)
        handle.seek(8)
        handle.write(patched)
