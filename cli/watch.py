"""`atelier jobs watch`: follow a job to its end over the events stream, polling when it fails.

The stream (`GET /v1/jobs/{id}/events`, `Accept: text/event-stream`) carries the job's events and
progress snapshots and closes when the job is terminal. A dropped stream is resumed after the last
event seen; a server or proxy that cannot stream at all gets polled instead.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from cli.client import TERMINAL, AtelierClient, StreamUnavailable
from cli.progress import ProgressBar

log = logging.getLogger(__name__)

# Consecutive stream failures before falling back to polling.
STREAM_TRIES = 3
EXIT_CODES = {"succeeded": 0, "failed": 1, "canceled": 3}


def describe_event(event: dict[str, Any]) -> str | None:
    """One line for a job event worth seeing above the bar; None for the rest."""
    kind, data, attempt = event["type"], event.get("data") or {}, event.get("attempt")
    if kind == "started":
        return f"started (attempt {attempt})"
    if kind == "checkpoint":
        return f"checkpoint at step {data.get('step')}"
    if kind == "sample":
        return f"samples at step {data.get('step')}"
    if kind == "resumed":
        return f"resumed from step {data.get('from_step')} (attempt {attempt})"
    if kind in ("failed", "canceled"):
        error = data.get("error") or {}
        return f"{kind}: {error.get('code')}: {error.get('message')}" if error.get("code") else kind
    if kind == "succeeded":
        return f"succeeded: artifact {data.get('artifact_id')}"
    return None


def _follow_stream(client: AtelierClient, job_id: str, bar: ProgressBar, after: int) -> tuple[int, bool]:
    """Read the stream until it closes; returns the last event id and whether it ended terminal."""
    for event in client.stream_events(job_id, after=after):
        if event.type == "progress":
            bar.update(progress=event.data)
            continue
        after = event.id if event.id is not None else after
        line = describe_event(event.data)
        if line:
            bar.note(line)
        if event.type in ("started", "resumed"):
            bar.update(status="running")
        if event.type in TERMINAL:
            return after, True  # the caller draws the final state from the job itself
    return after, False


def _stream(client: AtelierClient, job_id: str, bar: ProgressBar) -> bool:
    """Follow the stream to the job's end; False when it had to give up (then poll)."""
    after, failures = 0, 0
    while failures < STREAM_TRIES:
        try:
            after, ended = _follow_stream(client, job_id, bar, after)
        except StreamUnavailable as exc:
            log.debug("job %s: no event stream (%s); polling", job_id, exc)
            return False
        except (httpx.TransportError, ValueError) as exc:
            # A dropped connection, a read timeout on a quiet job, or a garbled event.
            failures += 1
            log.debug("job %s: event stream broke (%s); resuming after event %s", job_id, exc, after)
            continue
        if ended:
            return True
        # The server closed the stream: over if the job is terminal, else reconnect after `after`.
        if client.job(job_id)["status"] in TERMINAL:
            return True
        failures += 1
    return False


def watch_job(client: AtelierClient, job_id: str, bar: ProgressBar, *, poll_s: float = 1.0) -> dict[str, Any]:
    """Show the job's progress until it is terminal; returns the final job."""
    job = client.job(job_id)  # a missing job is a problem before any bar is drawn
    bar.update(status=job["status"], progress=job["progress"])
    try:
        if job["status"] not in TERMINAL and not _stream(client, job_id, bar):
            bar.note("(the event stream is unavailable; polling)")
            client.wait(
                job_id,
                on_progress=lambda j: bar.update(status=j["status"], progress=j["progress"]),
                poll_s=poll_s,
                timeout_s=None,
            )
        job = client.job(job_id)
        bar.update(status=job["status"], progress=job["progress"])
    finally:
        bar.close()
    return job
