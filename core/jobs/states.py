"""The job state machine. Every transition is one conditional UPDATE (design.md §4).

    queued → running → succeeded | failed | canceled      (cancel_requested is a flag)

Worker writes carry the attempt number as a fencing token: after a lease was reaped and the job
re-queued, the old worker's heartbeat or finish matches 0 rows and it learns it lost the lease.
A job is created, and its Idempotency-Key checked, in core/jobs/creation.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import Artifact, Job, JobEvent, JobStatus
from core.timeutil import utcnow
from core.webhooks import events as webhooks


class LeaseLost(Exception):
    """The worker's attempt no longer owns the job (reaped, canceled or finished elsewhere)."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id} attempt {attempt} no longer holds the lease")
        self.job_id = job_id
        self.attempt = attempt


def add_event(
    *, session: Session, job_id: str, attempt: int, type: str, data: dict[str, Any] | None = None
) -> None:
    job_event = JobEvent(job_id=job_id, attempt=attempt, type=type, data=data or {})
    session.add(job_event)
    # The webhook outbox row commits with the event, or neither does.
    webhooks.enqueue(session=session, job_event=job_event)


def mark_dispatched(*, session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
    session.commit()


def claim(*, session: Session, job_id: str, worker_id: str, lease_s: float) -> int | None:
    """queued → running. Returns the new attempt, or None when the job is not ours to run."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.queued,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
        .values(
            status=JobStatus.running,
            attempt=Job.attempt + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            worker_id=worker_id,
            started_at=now,
            updated_at=now,
            # A new attempt starts over from its first phase (step stays: it resumes from a checkpoint).
            phase=None,
            phase_done=None,
            phase_total=None,
        )
        .returning(Job.attempt)
    ).first()
    if row is None:
        session.rollback()
        return None
    attempt = int(row[0])
    add_event(session=session, job_id=job_id, attempt=attempt, type="started", data={"worker": worker_id})
    session.commit()
    return attempt


def _fenced(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
    return and_(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)


def heartbeat(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    lease_s: float,
    step: int | None = None,
    loss: float | None = None,
    images_per_s: float | None = None,
    phase: str | None = None,
    phase_done: int | None = None,
    phase_total: int | None = None,
) -> bool:
    """Renew the lease and record progress; returns whether cancellation was requested."""
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_s), "updated_at": now}
    if step is not None:
        values.update(step=step, loss=loss, images_per_s=images_per_s)
    if phase is not None:
        values.update(phase=phase, phase_done=phase_done, phase_total=phase_total)
    row = session.execute(
        update(Job).where(_fenced(job_id, attempt)).values(**values).returning(Job.cancel_requested)
    ).first()
    session.commit()
    if row is None:
        raise LeaseLost(job_id, attempt)
    return bool(row[0])


def record_checkpoint(*, session: Session, job_id: str, attempt: int, step: int, key: str) -> None:
    """Point the job at a fully uploaded checkpoint; only then may a retry resume from it."""
    result = session.execute(
        update(Job).where(_fenced(job_id, attempt)).values(checkpoint_step=step, checkpoint_key=key)
    )
    if result.rowcount == 0:
        session.rollback()
        raise LeaseLost(job_id, attempt)
    add_event(session=session, job_id=job_id, attempt=attempt, type="checkpoint", data={"step": step})
    session.commit()


@dataclass(frozen=True)
class ArtifactRecord:
    storage_prefix: str
    manifest: dict[str, Any]


def finish(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    error_code: str | None = None,
    error_message: str | None = None,
    artifact: ArtifactRecord | None = None,
) -> str | None:
    """running → terminal, fenced. On success the artifact row commits in the same transaction."""
    assert status.is_terminal
    now = utcnow()
    artifact_id = new_id("art") if artifact is not None else None
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "error_code": error_code,
        "error_message": error_message,
        "artifact_id": artifact_id,
    }
    if status == JobStatus.succeeded:
        values["step"] = Job.total_steps  # the last heartbeat may predate the final steps
        final_loss = (artifact.manifest.get("metrics") or {}).get("final_loss") if artifact else None
        if final_loss is not None:  # a job shorter than one heartbeat never reported a loss
            values["loss"] = final_loss
    row = session.execute(
        update(Job).where(_fenced(job_id, attempt)).values(**values).returning(Job.tenant_id, Job.spec)
    ).first()
    if row is None:
        session.rollback()
        raise LeaseLost(job_id, attempt)
    if artifact is not None:
        spec = row[1]
        session.add(
            Artifact(
                id=artifact_id,
                tenant_id=row[0],
                job_id=job_id,
                method=spec["params"]["method"],
                base_model=spec["base_model"],
                storage_prefix=artifact.storage_prefix,
                manifest=artifact.manifest,
            )
        )
    data = {"error": {"code": error_code, "message": error_message}} if error_code else {}
    if artifact_id:
        data["artifact_id"] = artifact_id
    add_event(session=session, job_id=job_id, attempt=attempt, type=str(status), data=data)
    session.commit()
    return artifact_id


def release(*, session: Session, job_id: str, attempt: int, error_code: str, error_message: str) -> JobStatus:
    """A transient failure of this attempt: back to queued, failed once attempts are used up, or
    canceled when cancellation was requested meanwhile."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.attempt != attempt or job.status != JobStatus.running:
        session.rollback()
        raise LeaseLost(job_id, attempt)
    if job.cancel_requested:
        # The user asked to stop: a re-queued job would be refused by claim and sit queued for ever.
        finish(session=session, job_id=job_id, attempt=attempt, status=JobStatus.canceled)
        return JobStatus.canceled
    if job.attempt >= job.max_attempts:
        finish(
            session=session,
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.failed,
            error_code=error_code,
            error_message=f"{error_message} (after {attempt} attempts)",
        )
        return JobStatus.failed
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt), Job.cancel_requested.is_(False))
        .values(status=JobStatus.queued, lease_expires_at=None, worker_id=None, dispatched_at=None)
    )
    if result.rowcount == 0:
        # Either the lease is gone or a cancel landed since the read above; finish() tells which.
        session.rollback()
        finish(session=session, job_id=job_id, attempt=attempt, status=JobStatus.canceled)
        return JobStatus.canceled
    add_event(
        session=session,
        job_id=job_id,
        attempt=attempt,
        type="requeued",
        data={"error": {"code": error_code, "message": error_message}},
    )
    session.commit()
    return JobStatus.queued


def hand_back(*, session: Session, job_id: str, attempt: int, reason: str) -> JobStatus:
    """The attempt's worker is shutting down: running → queued at once, to resume from the newest
    checkpoint on the next worker, rather than waiting for the reaper. A shutdown is not the job's
    fault, so it gives the attempt back (`max_attempts` grows by one). Canceled when cancellation
    was requested meanwhile. Raises LeaseLost when the attempt no longer owns the job."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt), Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.queued,
            max_attempts=Job.max_attempts + 1,
            lease_expires_at=None,
            worker_id=None,
            dispatched_at=None,
            updated_at=utcnow(),
        )
    )
    if result.rowcount == 0:
        # The lease is gone (finish() raises LeaseLost) or a cancel is pending: honour it now.
        session.rollback()
        finish(session=session, job_id=job_id, attempt=attempt, status=JobStatus.canceled)
        return JobStatus.canceled
    add_event(session=session, job_id=job_id, attempt=attempt, type="requeued", data={"reason": reason})
    session.commit()
    return JobStatus.queued


def running_on(*, session: Session, worker_ids: list[str]) -> list[tuple[str, int]]:
    """(job id, attempt) of the jobs these worker processes hold."""
    rows = session.execute(
        select(Job.id, Job.attempt).where(Job.status == JobStatus.running, Job.worker_id.in_(worker_ids))
    )
    return [(job_id, int(attempt)) for job_id, attempt in rows]


def request_cancel(*, session: Session, job: Job) -> Job:
    """queued → canceled at once; running → flag read by the worker at its next heartbeat."""
    now = utcnow()
    queued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued)
        .values(status=JobStatus.canceled, cancel_requested=True, finished_at=now, updated_at=now)
    )
    if queued.rowcount:
        add_event(session=session, job_id=job.id, attempt=job.attempt, type="canceled")
    else:
        flagged = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.running, Job.cancel_requested.is_(False))
            .values(cancel_requested=True, updated_at=now)
        )
        if flagged.rowcount:
            add_event(session=session, job_id=job.id, attempt=job.attempt, type="cancel_requested")
    session.commit()
    session.refresh(job)
    return job


def reap_stale(*, session: Session) -> list[str]:
    """Running jobs whose lease expired (the worker died): re-queue, cancel or fail them.

    Returns the ids that went back to queued, for the caller to re-send to the broker.
    """
    now = utcnow()
    # populate_existing: a job this session loaded earlier must be judged by its row now, or a stale
    # attempt number fences the reaper itself out and the dead worker's job is never re-queued.
    stale = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
        .execution_options(populate_existing=True)
    ).all()
    requeued = []
    for job in stale:
        attempt = job.attempt
        try:
            if job.cancel_requested:
                finish(session=session, job_id=job.id, attempt=attempt, status=JobStatus.canceled)
                continue
            status = release(
                session=session,
                job_id=job.id,
                attempt=attempt,
                error_code="worker_lost",
                error_message="the worker stopped heartbeating",
            )
        except LeaseLost:
            continue  # the worker came back and finished in between
        if status == JobStatus.queued:
            requeued.append(job.id)
    return requeued


def undispatched(*, session: Session, older_than_s: float) -> list[str]:
    """Queued jobs whose doorbell may have been lost (broker restart, crash after commit)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = session.scalars(
        select(Job.id).where(
            Job.status == JobStatus.queued,
            (Job.dispatched_at.is_(None) & (Job.created_at < cutoff)) | (Job.dispatched_at < cutoff),
        )
    )
    return list(rows)
