"""IP-Adapter → the original `.bin`: `torch.save({"image_proj": {...}, "ip_adapter": {...}})`.

The primary `ip_adapter.safetensors` holds the same tensors flat (`image_proj.<k>`, `ip_adapter.<k>`),
which diffusers and ComfyUI split by prefix. The `.bin` is what older tools and the reference
IP-Adapter code `torch.load`: exactly these two top-level keys, in this order (diffusers' Flux loader
compares `list(keys) == ["image_proj", "ip_adapter"]`), inner keys without the prefix.
Only dicts of tensors, so `torch.load(weights_only=True)` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.methods.ip_adapter import WEIGHT_NAME

PARTS = ("image_proj", "ip_adapter")


def _order(part: str, key: str) -> tuple[int, str]:
    """Processor entries by their numeric index (`ip_adapter.3` before `ip_adapter.11`), the order
    the adapter's ModuleList has; the projection's keys keep a plain order."""
    head = key.split(".", 1)[0]
    return (int(head), key) if part == "ip_adapter" and head.isdigit() else (0, key)


def split(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, tensor in flat.items():
        part, _, inner = key.partition(".")
        if part not in nested or not inner:
            raise ValueError(f"unexpected IP-Adapter weight {key!r} (expected image_proj.* / ip_adapter.*)")
        nested[part][inner] = tensor.contiguous()
    for part in PARTS:
        if not nested[part]:
            raise ValueError(f"the IP-Adapter artifact has no {part}.* weights")
    return {part: dict(sorted(nested[part].items(), key=lambda kv: _order(part, kv[0]))) for part in PARTS}


def export_bin(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    state = split(load_file(artifact_dir / WEIGHT_NAME))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ip-adapter_{ctx.name}.bin"
    torch.save(state, out_dir / name)
    return [name]
