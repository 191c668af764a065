"""The generation state machine: the jobs' (core/jobs/states.py, design.md §4), for one generation.

    queued → running → succeeded | failed | canceled      (cancel_requested is a flag)

Every transition is one conditional UPDATE. The attempt is the fencing token: a worker's heartbeat
and finish name it, so after the reaper took a dead worker's generation back (re-queued, or failed
`worker_lost` once `max_attempts` started), a worker that was only slow matches 0 rows and learns
it lost the lease, and its images are never recorded. A worker that shuts down hands its attempt
back (`hand_back`), which does not count against `max_attempts`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from core.models import Generation, JobStatus
from core.timeutil import utcnow

WORKER_LOST = "worker_lost"


class LeaseLost(Exception):
    """The worker's attempt no longer owns the generation (reaped, or finished elsewhere)."""

    def __init__(self, generation_id: str, attempt: int) -> None:
        super().__init__(f"generation {generation_id} attempt {attempt} no longer holds the lease")
        self.generation_id = generation_id
        self.attempt = attempt


def _fenced(generation_id: str, attempt: int) -> ColumnElement[bool]:
    return and_(
        Generation.id == generation_id,
        Generation.attempt == attempt,
        Generation.status == JobStatus.running,
    )


def _ended(status: JobStatus, *, now: datetime, **fields: Any) -> dict[str, Any]:
    assert status.is_terminal
    return {"status": status, "finished_at": now, "lease_expires_at": None, **fields}


def claim(*, session: Session, generation_id: str, worker_id: str, lease_s: float) -> int | None:
    """queued → running. Returns the new attempt, or None when the generation is not ours to run
    (a duplicate message, canceled, or already running or finished)."""
    now = utcnow()
    row = session.execute(
        update(Generation)
        .where(
            Generation.id == generation_id,
            Generation.status == JobStatus.queued,
            Generation.cancel_requested.is_(False),
            Generation.attempt < Generation.max_attempts,
        )
        .values(
            status=JobStatus.running,
            attempt=Generation.attempt + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            worker_id=worker_id,
            started_at=now,
        )
        .returning(Generation.attempt)
    ).first()
    session.commit()
    return None if row is None else int(row[0])


def heartbeat(*, session: Session, generation_id: str, attempt: int, lease_s: float) -> bool:
    """Renew the lease; returns whether cancellation was requested. LeaseLost when it is gone."""
    row = session.execute(
        update(Generation)
        .where(_fenced(generation_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Generation.cancel_requested)
    ).first()
    session.commit()
    if row is None:
        raise LeaseLost(generation_id, attempt)
    return bool(row[0])


def finish(
    *,
    session: Session,
    generation_id: str,
    attempt: int,
    status: JobStatus,
    image_keys: list[str] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    """running → terminal, fenced: LeaseLost when this attempt no longer owns the generation."""
    values = _ended(
        status, now=utcnow(), image_keys=image_keys, error_code=error_code, error_message=error_message
    )
    result = session.execute(update(Generation).where(_fenced(generation_id, attempt)).values(**values))
    if result.rowcount == 0:
        session.rollback()
        raise LeaseLost(generation_id, attempt)
    session.commit()


def hand_back(*, session: Session, generation_id: str, attempt: int) -> JobStatus:
    """The attempt's worker is shutting down: running → queued at once, for the next worker to start
    over, rather than a lease later by the reaper. A shutdown is not the generation's fault, so it
    gives the attempt back (`max_attempts` grows by one, as a job's does): the bound counts only
    workers lost. Canceled when cancellation was requested meanwhile. LeaseLost when the attempt no
    longer owns the generation."""
    result = session.execute(
        update(Generation)
        .where(_fenced(generation_id, attempt), Generation.cancel_requested.is_(False))
        .values(
            status=JobStatus.queued,
            max_attempts=Generation.max_attempts + 1,
            lease_expires_at=None,
            worker_id=None,
            dispatched_at=None,  # sent again by the caller, or by the reconciler
        )
    )
    if result.rowcount == 0:
        # The lease is gone (finish raises LeaseLost) or a cancel is pending: honour it now.
        session.rollback()
        finish(session=session, generation_id=generation_id, attempt=attempt, status=JobStatus.canceled)
        return JobStatus.canceled
    session.commit()
    return JobStatus.queued


def running_on(*, session: Session, worker_ids: list[str]) -> list[tuple[str, int]]:
    """(generation id, attempt) of the generations these worker processes hold."""
    rows = session.execute(
        select(Generation.id, Generation.attempt).where(
            Generation.status == JobStatus.running, Generation.worker_id.in_(worker_ids)
        )
    )
    return [(generation_id, int(attempt)) for generation_id, attempt in rows]


def request_cancel(*, session: Session, generation: Generation) -> Generation:
    """queued → canceled at once; running → a flag its worker reads at its next heartbeat, then
    stops at the next denoising step (the reaper cancels it if the worker died)."""
    now = utcnow()
    queued = session.execute(
        update(Generation)
        .where(Generation.id == generation.id, Generation.status == JobStatus.queued)
        .values(cancel_requested=True, **_ended(JobStatus.canceled, now=now))
    )
    if not queued.rowcount:
        session.execute(
            update(Generation)
            .where(Generation.id == generation.id, Generation.status == JobStatus.running)
            .values(cancel_requested=True)
        )
    session.commit()
    session.refresh(generation)
    return generation


def reap_stale(*, session: Session) -> list[str]:
    """Running generations whose lease expired (the worker died): canceled when that was asked,
    re-queued while attempts remain, else failed `worker_lost`. Returns the re-queued ids, for the
    caller to send again."""
    now = utcnow()
    # populate_existing: judge each by its row now, not by what this session loaded earlier.
    stale = session.scalars(
        select(Generation)
        .where(Generation.status == JobStatus.running, Generation.lease_expires_at < now)
        .execution_options(populate_existing=True)
    ).all()
    return [generation.id for generation in stale if _reap(session, generation, now)]


def _reap(session: Session, generation: Generation, now: datetime) -> bool:
    """One stale generation; True when it went back to queued. The UPDATE checks the lease again:
    a worker whose heartbeat landed since the select above keeps its generation."""
    attempt = generation.attempt
    guard = [_fenced(generation.id, attempt), Generation.lease_expires_at < now]
    requeue = False
    if generation.cancel_requested:
        values = _ended(JobStatus.canceled, now=now)
    elif attempt < generation.max_attempts:
        # A cancel landing after the select leaves it running and stale: the next round cancels it.
        guard.append(Generation.cancel_requested.is_(False))
        values = {"status": JobStatus.queued, "lease_expires_at": None, "worker_id": None}
        values["dispatched_at"] = None  # sent again by the caller, or by the reconciler
        requeue = True
    else:
        message = f"generation {generation.id}: its worker stopped responding in each of {attempt} attempts"
        values = _ended(JobStatus.failed, now=now, error_code=WORKER_LOST, error_message=message)
    result = session.execute(update(Generation).where(*guard).values(**values))
    session.commit()
    return requeue and result.rowcount == 1
