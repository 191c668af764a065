"""The queue as core sees it: a doorbell for a training job, a generation or a webhook delivery.

core never imports the Celery app (worker/; import-linter checks it). worker/app.py installs its
dispatcher when it is imported, which every process that sends (the API, workers, beat, `serve`)
does before it sends; a process without one (a library user calling core directly) gets a clear
error instead of a silent no-op. The database stays the truth: a lost doorbell is re-rung by the
reaper, so callers treat a failed send as a delay.
"""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    def send_train(self, job_id: str) -> None: ...

    def send_generate(self, generation_id: str) -> None: ...

    def send_webhook(self, delivery_id: str, countdown: float | None = None) -> None: ...


class NoDispatcher(RuntimeError):
    pass


_installed: Dispatcher | None = None


def install(dispatcher: Dispatcher) -> None:
    global _installed
    _installed = dispatcher


def current() -> Dispatcher:
    if _installed is None:
        raise NoDispatcher("no queue dispatcher is installed (worker/app.py installs Celery's on import)")
    return _installed


def send_train(job_id: str) -> None:
    current().send_train(job_id)


def send_generate(generation_id: str) -> None:
    current().send_generate(generation_id)


def send_webhook(delivery_id: str, countdown: float | None = None) -> None:
    current().send_webhook(delivery_id, countdown)
