"""A one-line training progress bar: status, step/total, loss, it/s and ETA.

The numbers are the server's (`job.progress`), not measured here: a bar attached to a job that has
been running for an hour shows its real rate and ETA at once. On a terminal the line redraws in
place; into a file or pipe it prints a line only when the status or the step changes.
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


def render(status: str, progress: dict[str, Any], *, width: int = BAR_WIDTH) -> str:
    step, total = int(progress.get("step") or 0), int(progress.get("total") or 0)
    filled = min(width, width * step // total) if total else 0
    parts = [f"{status:<9}", f"|{'█' * filled}{' ' * (width - filled)}|", f"{step}/{total}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("it_per_s"):
        parts.append(f"{progress['it_per_s']:.2f} it/s")
    if progress.get("eta_s") is not None and status == "running":
        parts.append(f"ETA {format_duration(progress['eta_s'])}")
    return "  ".join(parts)


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.status = "queued"
        self.progress: dict[str, Any] = {}
        self._shown = ""  # the line on screen (tty), or the last (status, step) printed
        self._key: tuple[str, int] | None = None

    def update(self, *, status: str | None = None, progress: dict[str, Any] | None = None) -> None:
        self.status = status or self.status
        if progress is not None:
            self.progress = progress
        line = render(self.status, self.progress)
        if self.tty:
            pad = " " * max(len(self._shown) - len(line), 0)
            self.stream.write(f"\r{line}{pad}")
            self._shown = line
        else:
            key = (self.status, int(self.progress.get("step") or 0))
            if key != self._key:
                self.stream.write(line + "\n")
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
