"""Textual Inversion → the A1111 / ComfyUI / kohya embedding `.safetensors`.

SD1/2: `{"emb_params": [n, dim]}`; SDXL: `{"clip_l": [n, dim_l], "clip_g": [n, dim_g]}` (CLIP-L rows
for `text_encoder`, OpenCLIP-G rows for `text_encoder_2`), read from the primary
`learned_embeds.safetensors` and checked against the widths of the base's text encoders.

What a user types: A1111 takes the prompt word from the FILE NAME STEM (not from anything inside the
file), and ComfyUI refers to it as `embedding:<stem>`. The file is therefore named after the
placeholder token when that is a safe file name (ASCII letters, digits, `_`, `-`): `my-cat` →
`my-cat.safetensors`, typed `my-cat`. Otherwise every run of other characters becomes `_` and `_` at
the ends is dropped: `<my-cat>` → `my-cat`, `<x>` → `x`, `a.b` → `a_b`; a token with nothing left
uses the export's name. The metadata says which word that is (`prompt_token`, `modelspec.trigger_phrase`)
and keeps the original token (`token`) for diffusers: `load_textual_inversion(file, token=token)`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.exports.lora import IMPL_STABILITY, describe_base, modelspec, read_config
from core.methods.textual_inversion import SDXL_KEYS, WEIGHT_NAME

SAFE_STEM = re.compile(r"[A-Za-z0-9_-]+")
UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


def prompt_word(token: str, fallback: str) -> str:
    """The file stem, i.e. the word A1111 users type for the embedding."""
    if SAFE_STEM.fullmatch(token):
        return token
    return UNSAFE_RUN.sub("_", token).strip("_") or fallback


def _width(base_path: Path, encoder: str) -> int:
    width = read_config(base_path, f"{encoder}/config.json").get("hidden_size")
    if width is None:
        raise ValueError(f"the base has no {encoder} config to check the embedding width against")
    return int(width)


def embedding_tensors(primary: dict[str, torch.Tensor], ctx: Any) -> dict[str, torch.Tensor]:
    """The export's tensors, each checked against the width of the encoder that will read it."""
    if ctx.family == "sdxl":
        if set(primary) != set(SDXL_KEYS.values()):
            raise ValueError(f"an SDXL embedding holds clip_l and clip_g, not {sorted(primary)}")
        tensors = {key: primary[key] for key in SDXL_KEYS.values()}  # clip_l, clip_g
        owners = {key: encoder for encoder, key in SDXL_KEYS.items()}
    else:
        if len(primary) != 1:
            raise ValueError(f"an SD embedding holds one token's rows, not {sorted(primary)}")
        tensors = {"emb_params": next(iter(primary.values()))}
        owners = {"emb_params": "text_encoder"}
    vectors = {tensor.shape[0] for tensor in tensors.values()}
    if len(vectors) != 1 or any(tensor.dim() != 2 for tensor in tensors.values()):
        raise ValueError(f"embedding shapes {[tuple(t.shape) for t in tensors.values()]} do not fit")
    for key, tensor in tensors.items():
        width = _width(Path(ctx.base_path), owners[key])
        if tensor.shape[1] != width:
            raise ValueError(f"{key} is {tensor.shape[1]} wide; the base's {owners[key]} is {width}")
    return {key: tensor.to(torch.float32).contiguous() for key, tensor in tensors.items()}


def export_a1111(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    """`<prompt word>.safetensors` with `emb_params` (SD1/2) or `clip_l` + `clip_g` (SDXL)."""
    tensors = embedding_tensors(load_file(artifact_dir / WEIGHT_NAME), ctx)
    token = ctx.params.placeholder_token
    word = prompt_word(token, ctx.name)
    rows = next(iter(tensors.values())).shape[0]
    metadata = {
        "token": token,
        "prompt_token": word,
        "num_vectors": str(rows),
        **modelspec(
            describe_base(ctx),
            adapter="textual-inversion",
            implementation=IMPL_STABILITY,
            title=word,
            timestamp=time.time(),
        ),
        "modelspec.trigger_phrase": word,
        "modelspec.usage_hint": (
            f"A1111: write {word} in the prompt; ComfyUI: embedding:{word}; "
            f"diffusers: load_textual_inversion(file, token={token!r}) and write {token}"
            + (
                " (SDXL: clip_l into text_encoder, clip_g into text_encoder_2)"
                if ctx.family == "sdxl"
                else ""
            )
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{word}.safetensors"
    save_file(tensors, str(out_dir / name), metadata=metadata)
    return [name]
