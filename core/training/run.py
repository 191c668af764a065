"""What one training run steps: everything `train` (core/training/loop.py) builds once, which each
step and the compiling helpers (core/training/compiling.py) read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.spec.job import JobSpec
from core.spec.training import TrainingParams
from core.training.caching import Batch, PairedData, TrainingData
from core.training.optim import Precision, autocast
from core.training.progress import TrainingHooks
from core.training.step import CompiledForward, CompileStats

if TYPE_CHECKING:  # methods build on the loop's pieces; the loop is handed a method
    from core.methods.base import Trainable


@dataclass
class Run:
    """Everything one step needs, built once by `train`."""

    spec: JobSpec
    trainable: Trainable
    data: TrainingData | PairedData
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    hooks: TrainingHooks
    workdir: Path
    resolution: int
    compile_stats: CompileStats
    compiled: CompiledForward | None = None

    @property
    def training(self) -> TrainingParams:
        return self.spec.training

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.precision)


def forward(run: Run, batch: Batch) -> torch.Tensor:
    with run.autocast():
        return run.trainable(batch)
