"""Hypernetwork → AUTOMATIC1111's `.pt` (also what ComfyUI's hypernetwork loader reads).

A1111 writes `torch.save(dict)` with one entry per context width, `width (int) → (k, v)` where k and
v are `HypernetworkModule.state_dict()` (keys `linear.{i}.weight|bias`), plus its options. Our
modules already have A1111's layer order and keys (see core/methods/hypernetwork.py), so this is a
re-grouping of `hypernetwork.safetensors` and a re-spelling of `hypernetwork.json`.

The file is a pickle by definition; it holds only ints, floats, strs, bools, None, lists, tuples,
(Ordered)dicts and tensors, so `torch.load(weights_only=True)` (ComfyUI's safe load) accepts it.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.methods.hypernetwork import CONFIG_NAME, WEIGHT_NAME

# Our weight_init names → A1111's (its UI and `HypernetworkModule` use these spellings).
WEIGHT_INIT = {
    "normal": "Normal",
    "xavier_uniform": "XavierUniform",
    "xavier_normal": "XavierNormal",
    "kaiming_uniform": "KaimingUniform",
    "kaiming_normal": "KaimingNormal",
}
_KEY = re.compile(r"(\d+)\.([kv])\.(linear\.(\d+)\.(weight|bias))")


def dropout_structure(layer_structure: list[float], dropout: float) -> list[float]:
    """A1111's per-layer dropout list: entry i+1 is the dropout after Linear i. Ours drops out after
    every hidden layer (never after the output), i.e. `[0, p, ..., p, 0]`."""
    hidden = len(layer_structure) - 2
    return [0.0, *[float(dropout)] * hidden, 0.0]


def module_states(weights: dict[str, torch.Tensor]) -> dict[int, tuple[OrderedDict, OrderedDict]]:
    """`{width: (k_state, v_state)}`, each state in Sequential order: ComfyUI rebuilds the MLP from
    the order of the `.weight` keys, and a lexical sort would put `linear.10` before `linear.2`."""
    grouped: dict[int, dict[str, list[tuple[int, str, str, torch.Tensor]]]] = {}
    for key, tensor in weights.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected hypernetwork weight {key!r}")
        width, side, name, index, kind = match.groups()
        sides = grouped.setdefault(int(width), {"k": [], "v": []})
        sides[side].append((int(index), kind != "weight", name, tensor.to(torch.float32).contiguous()))

    def ordered(entries: list[tuple[int, bool, str, torch.Tensor]]) -> OrderedDict:
        return OrderedDict((name, tensor) for _, _, name, tensor in sorted(entries, key=lambda e: e[:2]))

    return {width: (ordered(s["k"]), ordered(s["v"])) for width, s in sorted(grouped.items())}


def a1111_state(weights: dict[str, torch.Tensor], config: dict[str, Any], ctx: Any) -> dict[Any, Any]:
    layer_structure = [float(w) for w in config["layer_structure"]]
    dropout = float(config["dropout"])
    structure = dropout_structure(layer_structure, dropout)
    state: dict[Any, Any] = dict(module_states(weights))
    missing = {int(w) for w in config["widths"]} - set(state)
    if missing:
        raise ValueError(f"hypernetwork.safetensors lacks context widths {sorted(missing)}")
    metrics = ctx.metrics or {}
    state |= {
        "step": int(metrics.get("steps", ctx.training.max_steps)),
        "name": ctx.name,
        "layer_structure": layer_structure,
        "activation_func": config["activation"],
        "is_layer_norm": bool(config["layer_norm"]),
        "weight_initialization": WEIGHT_INIT[config["weight_init"]],
        # A1111 rebuilds dropout from `dropout_structure` when present, else from these two flags
        # (with its own p=0.3); both say the same here. Dropout is off at inference either way.
        "use_dropout": dropout > 0,
        "dropout_structure": structure,
        "last_layer_dropout": structure[-2] != 0,
        # A1111 reads a missing `activate_output` as True: always write it.
        "activate_output": bool(config["activate_output"]),
        # A1111 puts a 10-hex short hash of its checkpoint file here; we have no such file hash.
        "sd_checkpoint": None,
        "sd_checkpoint_name": ctx.base_model,
        "optional_info": None,
    }
    return state


def export_a1111(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    config = json.loads((artifact_dir / CONFIG_NAME).read_text())
    weights = load_file(artifact_dir / WEIGHT_NAME)
    state = a1111_state(weights, config, ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{ctx.name}.pt"
    torch.save(state, out_dir / name)
    return [name]
