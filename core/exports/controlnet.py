"""ControlNet → one `.safetensors` for ComfyUI / Forge / A1111 `models/controlnet` folders.

The file keeps diffusers' keys (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`, ...), as
`save_pretrained` writes them, because every consumer reads that layout directly:
- diffusers `ControlNetModel.from_single_file` detects it by `controlnet_cond_embedding.conv_in.weight`
  and `convert_controlnet_checkpoint` returns a checkpoint holding `time_embedding.linear_1.weight`
  unchanged; for SDXL its detection even needs a diffusers key (`add_embedding.linear_1.weight`).
  Its conversion of the original `control_model.*` layout instead fixes the hint block's output at
  `input_hint_block.14`, which only fits the 4-level embedding of a factor-8 VAE, and carries no
  SDXL `label_emb`: an LDM-key file would not load back for every base we train.
- ComfyUI's `load_controlnet` and sd-webui-controlnet's `build_model_by_guess` (A1111, Forge) both
  check for `controlnet_cond_embedding.conv_in.weight` and convert diffusers keys themselves.
So the export is the trained weights file under the user's name (shards merged into one file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from core.methods.controlnet import FOLDER

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def export_single_file(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    source = artifact_dir / FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{ctx.name}.safetensors"
    if (source / WEIGHTS).is_file():
        # Byte for byte: no tensor passes through memory, which matters at SDXL size (~5 GB fp32).
        shutil.copyfile(source / WEIGHTS, out_dir / name)
        return [name]
    if not (source / INDEX).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} (or its shard index) in {source}")
    shards = sorted(set(json.loads((source / INDEX).read_text())["weight_map"].values()))
    merged = {}
    for shard in shards:
        merged |= load_file(source / shard)
    save_file(merged, out_dir / name, metadata={"format": "pt"})
    return [name]
