"""What the loop measures while it trains, without a host sync per step: the loss, images/s and the
optimizer steps it skipped because their loss or gradient was not finite.

Everything sums on the device; only `Meter.flush`, at report points (about 100 per run), reads it
back: one host sync per report, as design.md asks (`.item()` only at log intervals).

A skipped step is what AMP's GradScaler does with a step whose fp16 gradients overflowed: the
optimizer does not step, so the weights stay those of the last finite step. One such step is a
spike and training goes on; many, or several in a row, mean the run has diverged, and it stops with
`training_diverged` (see `divergence`). Restoring the last finite checkpoint instead would replay
the same steps (all randomness is a function of seed and step) into the same divergence, and would
need a checkpoint the job may not keep.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Skipped steps in a row that end the run: weights that give a non-finite loss on ten different
# batches are not recovering.
MAX_CONSECUTIVE_SKIPS = 10
# Skipped steps in all, as a fraction of the run's steps (never fewer than MAX_CONSECUTIVE_SKIPS),
# that end it: a run that skips one step in twenty is not learning what was asked.
MAX_SKIPPED_FRACTION = 0.05


@dataclass(frozen=True)
class Reading:
    """What the meter read at one report point."""

    loss: float  # mean loss of the finite steps since the last flush; nan when none was finite
    images_per_s: float
    skipped: int  # steps skipped since the attempt started
    longest_run: int  # the most steps skipped in a row since the attempt started


def skip_bound(total_steps: int) -> int:
    return max(MAX_CONSECUTIVE_SKIPS, math.ceil(MAX_SKIPPED_FRACTION * total_steps))


def divergence(reading: Reading, *, done: int, trained: int, total: int, learning_rate: float) -> str | None:
    """Why training must stop at step `done` (`trained` steps into this attempt), or None."""
    if reading.longest_run < MAX_CONSECUTIVE_SKIPS and reading.skipped <= skip_bound(total):
        return None
    return (
        f"training diverged: {reading.skipped} of {trained} optimizer steps up to step {done} had a "
        f"non-finite loss or gradient ({reading.longest_run} in a row) and were skipped; nothing was "
        f"stored. A lower learning rate (this job's: {learning_rate:g}) or a larger batch usually helps"
    )


class Meter:
    """Sums loss and skipped steps on the device; only `flush` (at report points) syncs with the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.skipped = torch.zeros((), device=device)
        self.run = torch.zeros((), device=device)  # skipped steps in a row, up to the last one
        self.longest_run = torch.zeros((), device=device)
        self._reset()
        self.started = time.perf_counter()
        self.images_total = 0

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.finite = torch.zeros((), device=self.device)
        self.images, self.since = 0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave checkpoints and samples out of the images/s figures."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # rare (checkpoint/sample points): finish queued steps first
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.since += elapsed
            self.started += elapsed

    def _count(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        # A skipped step's loss is nan or inf: it would poison the sum, so it counts as a skip only.
        self.loss += torch.where(skipped, torch.zeros_like(loss), loss)
        self.finite += ~skipped
        self.skipped += skipped
        self.run.add_(1).mul_(skipped)
        torch.maximum(self.longest_run, self.run, out=self.longest_run)

    def add(self, loss: torch.Tensor, skipped: torch.Tensor, images: int) -> None:
        self._count(loss, skipped)
        self.images += images
        self.images_total += images

    def add_untimed(self, loss: torch.Tensor, skipped: torch.Tensor, elapsed: float) -> None:
        """A step whose time went mostly to compiling: its loss counts, its time and images don't."""
        self._count(loss, skipped)
        self.since += elapsed
        self.started += elapsed

    def flush(self) -> Reading:
        """The loss and images/s since the last flush, and the skips so far."""
        loss_sum, finite, skipped, longest = torch.stack(
            [self.loss, self.finite, self.skipped, self.longest_run]
        ).tolist()
        rate = self.images / max(time.perf_counter() - self.since, 1e-9)
        self._reset()
        loss = loss_sum / finite if finite else float("nan")
        return Reading(loss, rate, int(skipped), int(longest))

    def overall_rate(self) -> float:
        return self.images_total / max(time.perf_counter() - self.started, 1e-9)
