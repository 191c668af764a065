"""What the loop measures while it trains, without a host sync per step: the loss, images/s and the
optimizer steps it skipped because their loss or gradient was not finite.

Everything sums on the device; only `Meter.flush`, at report points (about 100 per run), reads it
back: one host sync per report, as design.md asks (`.item()` only at log intervals).

A skipped step is what AMP's GradScaler does with a step whose fp16 gradients overflowed: the
optimizer does not step, so the weights stay those of the last finite step. One such step is a
spike and training goes on; many, or several in a row, mean the run has diverged, and it stops with
`training_diverged` (`stop_if_diverged`). Restoring the last finite checkpoint instead would replay
the same steps (all randomness is a function of seed and step) into the same divergence, and would
need a checkpoint the job may not keep.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from core.errors import NonFiniteError
from core.spec.training import TrainingParams

log = logging.getLogger(__name__)

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


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
) -> torch.Tensor:
    """Step the optimizer unless the loss or the gradient is not finite (a non-finite gradient has a
    non-finite norm); returns "skipped" as a bool tensor on the device, for the meter to count."""
    if scaler.is_enabled():
        # fp16: the scaler skips steps whose scaled gradients overflowed and lowers its scale. That
        # is its calibration, not divergence: only a non-finite loss counts.
        scaler.step(optimizer)
        return ~torch.isfinite(loss)
    skipped = ~torch.isfinite(loss + grad_norm)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused AdamW reads GradScaler's `found_inf` on the device and leaves weights, moments and
        # its step count as they were: a skip without a host sync (the scaler's own protocol).
        optimizer.grad_scale, optimizer.found_inf = None, skipped.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not skipped.item():
        # Optimizers without that protocol (8-bit AdamW, Adafactor) cannot skip on the device: one
        # host sync per step, on the large full fine-tunes they serve, where a step is GPU-bound.
        optimizer.step()
    return skipped


def stop_if_diverged(
    reading: Reading, training: TrainingParams, *, done: int, start: int, reported: int
) -> int:
    """Raise NonFiniteError("training_diverged") at step `done` past the bounds; log skips new since
    the last reading (`reported` of them then). Returns the skips so far."""
    if reading.longest_run >= MAX_CONSECUTIVE_SKIPS or reading.skipped > skip_bound(training.max_steps):
        raise NonFiniteError(
            "training_diverged",
            f"training diverged: {reading.skipped} of {done - start} optimizer steps up to step {done} "
            f"had a non-finite loss or gradient ({reading.longest_run} in a row) and were skipped; "
            f"nothing was stored. A lower learning rate (this job's: {training.learning_rate:g}) or a "
            "larger batch usually helps",
        )
    if reading.skipped > reported:
        log.warning(
            "%d optimizer steps skipped up to step %d: non-finite loss or gradient",
            reading.skipped,
            done,
            extra={"step": done, "skipped_steps": reading.skipped},
        )
    return reading.skipped


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
