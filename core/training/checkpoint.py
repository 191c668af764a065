"""Checkpoint folders: everything a retried attempt needs to continue exactly where one stopped.

A folder holds the trainable tensors (safetensors), the optimizer / lr-scheduler / grad-scaler state
and the RNG state (one torch file, loaded with `weights_only=True` only), and `state.json` with the
step, written last: a folder without state.json is incomplete and never loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "trainable.safetensors"
TRAINING_STATE = "training_state.pt"
STATE = "state.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or belongs to another kind of run."""


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    method: str,
    trainable_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    grad_scaler: torch.amp.GradScaler,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable_state.items()}, folder / TENSORS)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": grad_scaler.state_dict(),
            "rng": _rng_state(),
        },
        folder / TRAINING_STATE,
    )
    tmp = folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps({"step": step, "method": method, "format_version": FORMAT_VERSION}))
    os.replace(tmp, folder / STATE)


def read_step(folder: Path) -> int:
    path = folder / STATE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {STATE}; the checkpoint is incomplete")
    return int(json.loads(path.read_text())["step"])


def load_checkpoint(
    folder: Path,
    *,
    method: str,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    grad_scaler: torch.amp.GradScaler,
) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore optimizer, scheduler, scaler and RNG in place; return (step, trainable tensors)."""
    step = read_step(folder)
    state = json.loads((folder / STATE).read_text())
    if state.get("method") != method or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: a {state.get('method')!r} checkpoint cannot resume a {method!r} run"
        )
    tensors = load_file(folder / TENSORS, device="cpu")
    # Checkpoints come back from storage: never unpickle arbitrary objects from them.
    extra = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    lr_scheduler.load_state_dict(extra["lr_scheduler"])
    grad_scaler.load_state_dict(extra["grad_scaler"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return step, tensors
