"""A one-line job progress bar: status, the phase and its done/total, or step/total, loss, it/s, ETA.

The numbers are the server's (`job.progress`), not measured here: a bar attached to a job that has
been running for an hour shows its real rate and ETA at once. Before and after training the bar
follows the job's phase (downloading the base, class images, caching latents, exporting, uploading).
On a terminal the line redraws in place; into a file or pipe (a CI log) it prints one plain line per
update (status, phase, step or done changed) and never a carriage return.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """2:05, or 1:02:05 past an hour."""
    total = max(round(seconds), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _phase_counts(status: str, progress: dict[str, Any]) -> tuple[str, int, int] | None:
    """(phase, done, total) while a running job is in a phase other than training; None otherwise
    (then the steps tell more: training, queued, finished, or a server that reports no phases)."""
    phase = progress.get("phase")
    if status != "running" or not phase or phase == "training":
        return None
    return phase, int(progress.get("phase_done") or 0), int(progress.get("phase_total") or 0)


def _training_parts(status: str, progress: dict[str, Any]) -> list[str]:
    parts = []
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("it_per_s"):
        parts.append(f"{progress['it_per_s']:.2f} it/s")
    if progress.get("eta_s") is not None and status == "running":
        parts.append(f"ETA {format_duration(progress['eta_s'])}")
    return parts


def _bar(done: int, total: int, width: int) -> str:
    filled = min(width, width * done // total) if total else 0
    return f"|{'█' * filled}{' ' * (width - filled)}|"


def render(status: str, progress: dict[str, Any], *, width: int = BAR_WIDTH) -> str:
    """The line a terminal redraws: a bar over the current phase, or over the training steps."""
    counts = _phase_counts(status, progress)
    if counts is not None:
        phase, done, total = counts
        return "  ".join([f"{status:<9}", _bar(done, total, width), f"{phase} {done}/{total}"])
    step, total = int(progress.get("step") or 0), int(progress.get("total") or 0)
    steps = f"training {step}/{total}" if progress.get("phase") == "training" else f"{step}/{total}"
    return "  ".join([f"{status:<9}", _bar(step, total, width), steps, *_training_parts(status, progress)])


def log_line(status: str, progress: dict[str, Any], *, label: str | None = None) -> str:
    """One line for a log: `job_… running caching_latents 12/40`, `job_… running training step
    10/60 loss 0.1200 3.4 img/s ETA 0:12`; no bar, which a log would only repeat."""
    parts = [label] if label else []
    parts.append(status)
    counts = _phase_counts(status, progress)
    if counts is not None:
        phase, done, total = counts
        return " ".join([*parts, f"{phase} {done}/{total}"])
    if progress.get("phase") == "training":
        parts.append("training")
    parts.append(f"step {int(progress.get('step') or 0)}/{int(progress.get('total') or 0)}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("images_per_s"):
        parts.append(f"{progress['images_per_s']:.1f} img/s")
    if progress.get("eta_s") is not None and status == "running":
        parts.append(f"ETA {format_duration(progress['eta_s'])}")
    return " ".join(parts)


class ProgressBar:
    """`label` (the job id) starts each log line, so several jobs' lines in one log stay apart."""

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, label: str | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.label = label
        self.status = "queued"
        self.progress: dict[str, Any] = {}
        self._shown = ""  # the line on screen (tty)
        self._key: tuple[Any, ...] | None = None  # what the last log line showed (not a tty)

    def update(self, *, status: str | None = None, progress: dict[str, Any] | None = None) -> None:
        self.status = status or self.status
        if progress is not None:
            self.progress = progress
        if self.tty:
            line = render(self.status, self.progress)
            pad = " " * max(len(self._shown) - len(line), 0)
            self.stream.write(f"\r{line}{pad}")
            self._shown = line
        else:
            p = self.progress
            key = (self.status, p.get("phase"), p.get("phase_done"), p.get("phase_total"), p.get("step"))
            if key != self._key:
                self.stream.write(log_line(self.status, p, label=self.label) + "\n")
                self._key = key
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line above the bar (an event), which then redraws below it."""
        if self.tty and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._shown:
            self.stream.write(self._shown)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = ""
