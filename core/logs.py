"""Structured logs: one JSON object per line, carrying the job id and attempt of the work in hand.

`configure_logging()` installs one handler on the root logger; every process role calls it at start
(the CLI for `serve`, `worker` and `beat`; Celery's `setup_logging` signal in worker/app.py, which
also keeps Celery from installing its own). `ATELIER_LOG_FORMAT=json|text` picks the format (json by
default in the servers, text in the CLI's interactive commands) and `ATELIER_LOG_LEVEL` the level.

`log_context(job_id=..., attempt=...)` binds fields for the duration of a block, through a context
variable: every record logged inside it, by any logger, carries them, and nothing outside it does.
A thread started inside the block does not inherit it (threads start with an empty context); run
its target in `contextvars.copy_context()` to carry the fields along.

These are read from the environment rather than `Settings`: logging is set up before settings are
loaded (a bad setting must itself be logged), and the CLI's interactive commands have no settings.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Literal

LogFormat = Literal["json", "text"]
FORMATS: tuple[LogFormat, ...] = ("json", "text")
FORMAT_ENV = "ATELIER_LOG_FORMAT"
LEVEL_ENV = "ATELIER_LOG_LEVEL"

_context: ContextVar[Mapping[str, Any]] = ContextVar("atelier_log_context", default=MappingProxyType({}))

# Attributes every LogRecord has; anything else on a record came from `extra=` or the bound context.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn duplicates each message with ANSI colours for its own console formatter.
    "color_message",
}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind `fields` (e.g. job_id, attempt) to every record logged inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record. It sits on the handler, not on a logger, because a
    logger's filters see only records logged on that logger, not those propagated from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            # An explicit `extra=` on the call wins over the bound value.
            record.__dict__.setdefault(key, value)
        return True


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an extra that is not JSON (a Path, an exception) is written as its text, never
        # dropped and never an error that loses the record.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, then the bound and extra fields as key=value, so text logs keep the job id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = record_extras(record)
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # fields go on the message line, before a traceback
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{head} [{fields}]{sep}{tail}"


class _AtelierHandler(logging.StreamHandler):
    """Marks the handler this module installed, so configuring again replaces it instead of adding one."""


def log_format(default: LogFormat) -> LogFormat:
    value = os.environ.get(FORMAT_ENV, "").strip().lower() or default
    if value not in FORMATS:
        raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, not {value!r}")
    return value  # type: ignore[return-value]


def log_level(level: int | str | None = None) -> int:
    """An explicit level (a CLI flag) wins over ATELIER_LOG_LEVEL; INFO otherwise."""
    value = level or os.environ.get(LEVEL_ENV, "").strip() or "INFO"
    if isinstance(value, int):
        return value
    number = logging.getLevelName(value.upper())
    if not isinstance(number, int):
        raise ValueError(f"{LEVEL_ENV}: unknown log level {value!r}")
    return number


def configure_logging(
    *,
    default_format: LogFormat = "json",
    level: int | str | None = None,
    stream: IO[str] | None = None,
    force: bool = False,
) -> logging.Handler | None:
    """Install Atelier's handler on the root logger; returns it, or None when left alone.

    Like `logging.basicConfig`, a root logger that already has handlers someone else installed
    (pytest's capture, an embedding application) is left alone unless `force` is given.
    """
    fmt, number = log_format(default_format), log_level(level)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _AtelierHandler)]
    for handler in ours:
        root.removeHandler(handler)
    if root.handlers and not force:
        return None
    # sys.__stderr__: Celery redirects sys.stderr into logging; writing there would loop back.
    handler = _AtelierHandler(stream or sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(number)
    return handler


def is_configured() -> bool:
    return any(isinstance(h, _AtelierHandler) for h in logging.getLogger().handlers)


def adopt_loggers(names: tuple[str, ...] = ("uvicorn", "uvicorn.error", "uvicorn.access")) -> None:
    """Send these loggers' records through the root handler, once this module configured it.

    uvicorn installs its own text handlers after the CLI configured logging, so the API calls this
    at startup. Where something else owns logging (tests, an embedding app), nothing changes.
    """
    if not is_configured():
        return
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
