"""diffusers → original Stable Diffusion ("LDM") tensor names, for single-file checkpoints.

The original layout numbers the UNet sequentially: `input_blocks.0` is conv_in, then each down level
contributes one `input_blocks.i` per layer (`.0` the resnet, `.1` its transformer where the level
attends) and one more for its downsampler (`.0.op`) unless it is the last level; `middle_block.0/1/2`
is resnet / transformer / resnet; each up level has layers_per_block + 1 `output_blocks.i`, the last
of which also holds the upsampler (`.1.conv`, or `.2.conv` behind a transformer). Transformer
internals keep their names. The tables are therefore built from the UNet/VAE config, so the tiny
bases (2 levels, attention on the second) and SD1.5 / SDXL map by the same code.

The VAE's encoder/decoder use `down.i.block.j` / `up.i.block.j` (the decoder's levels counted from
the bottom), `mid.block_1/2`, `mid.attn_1`, whose q/k/v/proj_out are 1x1 convs where diffusers
has linears. Text encoders: CLIP-L keeps transformers' names under its prefix; OpenCLIP (SDXL's
second encoder, SD2's only one) fuses q/k/v into `attn.in_proj_*`, stores `text_projection` as
(width, projection) and renames embeddings, norms and MLPs.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

Renames = tuple[tuple[str, str], ...]
# (diffusers module prefix, original module prefix, renames of the first name after the prefix)
Entry = tuple[str, str, Renames]

UNET_RESNET: Renames = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
VAE_RESNET: Renames = (("conv_shortcut.", "nin_shortcut."),)
VAE_ATTENTION: Renames = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
OPEN_CLIP_LAYER: Renames = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
OPEN_CLIP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)")


def _attends(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttnDownBlock2D, AttnUpBlock2D ...


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def unet_table(config: dict[str, Any]) -> list[Entry]:
    """Every UNet module's original name, walking the levels as the original numbering does."""
    table: list[Entry] = [
        ("conv_in.", "input_blocks.0.0.", ()),
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()),  # SDXL's size/crop/pooled-text embedding
        ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
    ]
    down, up = config["down_block_types"], config["up_block_types"]
    layers = _per_level(config["layers_per_block"], len(down))
    index = 1
    for level, kind in enumerate(down):
        for layer in range(layers[level]):
            table.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", UNET_RESNET))
            if _attends(kind):
                table.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", ()))
            index += 1
        if level < len(down) - 1:
            table.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", ()))
            index += 1
    # Other mid blocks have no original counterpart: their keys stay unmapped and the export fails.
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        table += [
            ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
            ("mid_block.attentions.0.", "middle_block.1.", ()),
            ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
        ]
    index = 0
    for level, (kind, count) in enumerate(zip(up, reversed(layers), strict=True)):
        for layer in range(count + 1):
            table.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", UNET_RESNET))
            if _attends(kind):
                table.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", ()))
            if layer == count and level < len(up) - 1:
                slot = 2 if _attends(kind) else 1
                upsampler = (
                    f"up_blocks.{level}.upsamplers.0.conv.",
                    f"output_blocks.{index}.{slot}.conv.",
                    (),
                )
                table.append(upsampler)
            index += 1
    return table


def vae_table(config: dict[str, Any]) -> list[Entry]:
    table: list[Entry] = [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in.", f"{part}.conv_in.", ()),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
            (f"{part}.conv_out.", f"{part}.conv_out.", ()),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION),
        ]
    levels, layers = len(config["down_block_types"]), config["layers_per_block"]
    for level in range(levels):
        ours, theirs = f"encoder.down_blocks.{level}.", f"encoder.down.{level}."
        table += [(f"{ours}resnets.{j}.", f"{theirs}block.{j}.", VAE_RESNET) for j in range(layers)]
        if level < levels - 1:
            table.append((f"{ours}downsamplers.0.conv.", f"{theirs}downsample.conv.", ()))
    levels = len(config["up_block_types"])
    for level in range(levels):
        # The original decoder counts its levels from the bottom.
        ours, theirs = f"decoder.up_blocks.{level}.", f"decoder.up.{levels - 1 - level}."
        table += [(f"{ours}resnets.{j}.", f"{theirs}block.{j}.", VAE_RESNET) for j in range(layers + 1)]
        if level < levels - 1:
            table.append((f"{ours}upsamplers.0.conv.", f"{theirs}upsample.conv.", ()))
    return table


def renamed(state: dict[str, torch.Tensor], table: list[Entry], what: str) -> dict[str, torch.Tensor]:
    """`state` under the table's names. A key the table does not cover fails the export: a file
    missing weights would load with random ones in tools that load non-strictly."""
    out, unmapped = {}, []
    for key, tensor in state.items():
        for source, target, renames in table:
            if key.startswith(source):
                rest = key[len(source) :]
                out[target + (_rename(rest, renames) or rest)] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} tensors have no original-layout name, e.g. {unmapped[:3]}")
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + key: value for key, value in renamed(state, unet_table(config), "unet").items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in renamed(state, vae_table(config), "vae").items():
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> the original's 1x1 conv
        out[VAE_PREFIX + key] = value
    return out


def text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 saves CLIPTextModel without its `text_model.` level (the projection model
    and older files keep it): one naming for both."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
        for k, v in state.items()
    }


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L keeps transformers' names (`<prefix>text_model.encoder.layers...`)."""
    return {prefix + key: value for key, value in text_model_keys(state).items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out, qkv, unmapped = {}, {}, []
    for key, value in text_model_keys(state).items():
        if key in OPEN_CLIP_NAMES:
            out[OPEN_CLIP_NAMES[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif key == "text_model.embeddings.position_ids":
            continue  # a transformers buffer; OpenCLIP has none
        elif match := QKV.fullmatch(key):
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
        elif (match := LAYER.fullmatch(key)) and (name := _rename(match.group(2), OPEN_CLIP_LAYER)):
            out[f"transformer.resblocks.{match.group(1)}.{name}"] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"open_clip: {len(unmapped)} tensors have no original-layout name, e.g. {unmapped[:3]}"
        )
    for (layer, kind), parts in qkv.items():
        # One fused projection, rows in q, k, v order.
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return {prefix + key: value for key, value in out.items()}


def _rename(name: str, renames: Renames) -> str | None:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return None
