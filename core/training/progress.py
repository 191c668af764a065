"""How the training loop talks to its owner: one hooks object, nothing else.

The worker's hooks renew the lease, record progress and checkpoints (fenced by `attempt`) and raise
`StopTraining` when a cancel is requested or the lease is lost. The bench, the CLI and tests use
`NullHooks` or `ConsoleHooks`. The loop calls `.item()` on the loss only when `should_report` says so,
so a hooks object that reports rarely keeps the GPU free of host syncs.

A job goes through phases (core.training.phases, in order; a job skips those it does not need): each reports
`done`/`total` in its own units (pre-training steps, images, optimizer steps, files) through
`hooks.phase`, as often as it likes: the hooks bound how often that reaches anyone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from core.training.phases import Phase


class StopTraining(Exception):
    """Raised by hooks to end training early; the loop lets it propagate to the owner."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrainingHooks(Protocol):
    def should_report(self, step: int) -> bool: ...

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None: ...

    def phase(self, name: Phase, *, done: int, total: int) -> None:
        """`done` of `total` units of phase `name`; a new name means the job entered that phase."""
        ...

    def save_checkpoint(self, *, step: int, folder: Path) -> None: ...

    def load_checkpoint(self) -> tuple[int, Path] | None: ...

    def save_samples(self, *, step: int, images: list[Any], prompts: list[str]) -> None: ...

    def cached_images(self, *, key: str, count: int, make: Callable[[int], list[Any]]) -> list[Any]:
        """`count` images stored under `key` by an earlier job, or `make(count)` (PIL images), stored
        for the next one. `key` must name everything the images depend on (DreamBooth's class images:
        base fingerprint, prompt, count, size, steps, seed)."""
        ...


def phase_reporter(
    hooks: TrainingHooks, name: Phase, *, total: int, offset: int = 0
) -> Callable[[int, int], None]:
    """A `(done, _)` callback for code that counts its own part of a phase: it reports `offset +
    done` of the whole phase's `total` (DreamBooth caches its instance and then its class images)."""
    return lambda done, _part_total: hooks.phase(name, done=offset + done, total=total)


class Throttle:
    """True at most once per `interval_s` (and always for the first call)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


class NullHooks:
    """Reports nothing, keeps no checkpoints; `report_every` steps force a report (tests use 1)."""

    def __init__(self, report_every: int | None = None) -> None:
        self.report_every = report_every

    def should_report(self, step: int) -> bool:
        return self.report_every is not None and step % self.report_every == 0

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        return None

    def phase(self, name: Phase, *, done: int, total: int) -> None:
        return None

    def save_checkpoint(self, *, step: int, folder: Path) -> None:
        return None

    def load_checkpoint(self) -> tuple[int, Path] | None:
        return None

    def save_samples(self, *, step: int, images: list[Any], prompts: list[str]) -> None:
        return None

    def cached_images(self, *, key: str, count: int, make: Callable[[int], list[Any]]) -> list[Any]:
        return make(count)


class ConsoleHooks(NullHooks):
    """A tqdm bar (step/total, loss, img/s, ETA) for the bench and the CLI; samples go to a folder."""

    def __init__(self, *, interval_s: float = 1.0, samples_dir: Path | None = None) -> None:
        super().__init__()
        self._throttle = Throttle(interval_s)
        self._bar: tqdm | None = None
        self._phase_bar: tqdm | None = None
        self._phase_name: str | None = None
        self._samples_dir = samples_dir

    def should_report(self, step: int) -> bool:
        return self._throttle()

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
        if step >= total:
            self._bar.close()

    def phase(self, name: Phase, *, done: int, total: int) -> None:
        # Training has its own bar (with loss and img/s); the phases before and after get one each.
        if name == "training":
            return
        if name != self._phase_name:
            if self._phase_bar is not None:
                self._phase_bar.close()
            self._phase_name, self._phase_bar = name, tqdm(total=total, desc=name, dynamic_ncols=True)
        if self._phase_bar is None:  # this phase's bar is already complete
            return
        self._phase_bar.total = total
        self._phase_bar.update(done - self._phase_bar.n)
        if done >= total:
            self._phase_bar.close()
            self._phase_bar = None

    def save_samples(self, *, step: int, images: list[Any], prompts: list[str]) -> None:
        if self._samples_dir is None:
            return
        self._samples_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(self._samples_dir / f"step{step:06d}_{index}.png")
