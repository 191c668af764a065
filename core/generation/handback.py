"""A generate worker that shuts down hands its running generation back, as a training worker hands
back its job (core/jobs/runner.py): queued again at once and re-sent, so the next worker starts it
over now rather than a lease later, and without spending one of its bounded attempts.

The attempt calls `hand_back` when it stops at a denoising step for the shutdown (SHUTDOWN, see
core/generation/heartbeat.py); the worker's main process calls it for the generations of pool
processes it had to kill (worker/lifecycle.py).
"""

from __future__ import annotations

import logging

from core import dispatch
from core.config import Settings
from core.db import session_scope
from core.generation import queue, states
from core.generation.heartbeat import LEASE_LOST, SHUTDOWN
from core.models import JobStatus

log = logging.getLogger(__name__)

HANDED_BACK = "handed_back"


def hand_back(*, settings: Settings, generation_id: str, attempt: int) -> str:
    """Give `attempt` back because its worker stops. Returns HANDED_BACK, "canceled" (a cancel was
    pending: honoured now) or LEASE_LOST (the attempt no longer owned the generation)."""
    try:
        with session_scope(settings.database_url) as session:
            status = states.hand_back(session=session, generation_id=generation_id, attempt=attempt)
    except states.LeaseLost:
        return LEASE_LOST
    if status != JobStatus.queued:
        return str(status)
    log.info("generation %s attempt %s requeued: %s", generation_id, attempt, SHUTDOWN)
    try:
        dispatch.send_generate(generation_id)
    except Exception:
        # The broker is down: dispatched_at stays empty, so the reaper's reconciler re-sends it.
        log.warning("generation %s handed back but not re-sent; the reaper re-sends it", generation_id)
        return HANDED_BACK
    with session_scope(settings.database_url) as session:
        queue.mark_dispatched(session=session, generation_id=generation_id)
    return HANDED_BACK
