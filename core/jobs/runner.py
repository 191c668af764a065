"""Runs one training job attempt: claim → load base and data → the loop → artifact → finish.

The worker task is a thin call into `run_training_job`. Everything the loop needs from the
outside world (lease renewal, cancel, checkpoints, samples) goes through `JobHooks`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from sqlalchemy import func, select

from core import dispatch
from core.config import Settings
from core.db import session_scope
from core.jobs import scheduling
from core.jobs import states as jobs
from core.jobs.attempt import PermanentJobError, train_and_store
from core.jobs.hooks import Heartbeat, JobHooks
from core.logs import log_context
from core.models import Dataset, Job, JobStatus
from core.storage.base import Storage, StorageError
from core.storage.keys import job_prefix

log = logging.getLogger(__name__)


def run_training_job(*, job_id: str, settings: Settings, storage: Storage, worker_id: str) -> str | None:
    """Answer a train message: claim the next job by the fair rule (core/jobs/scheduling.py; the
    message's `job_id` only rang the bell) and run one attempt of it. Returns the final or interim
    status, None when nothing could start (all claimed, canceled, or their tenants at their limit)."""
    with session_scope(settings.database_url) as session:
        claimed = scheduling.claim_next(session=session, settings=settings, worker_id=worker_id)
        if claimed is None:
            log.info("message for job %s: no job may start now (none queued or all capped)", job_id)
            return None
        job_id, attempt = claimed.job_id, claimed.attempt
        job = session.get(Job, job_id)
        assert job is not None
        # None only for a personalisation job (init_from) trained on its reference images.
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
    # Every record logged during the attempt, by any logger in this thread, carries these fields.
    with log_context(job_id=job_id, attempt=attempt):
        log.info("job %s attempt %s started", job_id, attempt, extra={"method": job.method})
        heartbeat = Heartbeat(settings=settings, job_id=job_id, attempt=attempt)
        heartbeat.start()
        workdir = Path(tempfile.mkdtemp(prefix=f"atelier-{job_id}-"))
        try:
            hooks = JobHooks(
                settings=settings,
                storage=storage,
                job=job,
                attempt=attempt,
                heartbeat=heartbeat,
                workdir=workdir,
            )
            outcome = _attempt(settings, storage, job, dataset, attempt, hooks, workdir)
            log.info("job %s attempt %s ended: %s", job_id, attempt, outcome)
            return outcome
        finally:
            heartbeat.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            _ring_for_tenant(settings, job.tenant_id)


def _ring_for_tenant(settings: Settings, tenant_id: str) -> None:
    """A running slot of this tenant is free again. If the tenant was at its running-jobs limit, a
    message may have found its jobs capped and been spent: ring once more for its waiting jobs."""
    from core.tenants.limits import tenant_limits

    try:
        with session_scope(settings.database_url) as session:
            running = session.scalar(
                select(func.count()).where(Job.tenant_id == tenant_id, Job.status == JobStatus.running)
            )
            cap = tenant_limits(session=session, settings=settings, tenant_id=tenant_id).max_running_jobs
            waiting = scheduling.next_waiting(session=session, tenant_id=tenant_id)
        if waiting is not None and int(running or 0) + 1 >= cap:
            dispatch.send_train(waiting)
    except Exception:
        # The reaper re-sends queued jobs that waited past queued_redispatch_s.
        log.warning("could not ring for tenant %s's waiting jobs", tenant_id, exc_info=True)


def _attempt(
    settings: Settings,
    storage: Storage,
    job: Job,
    dataset: Dataset | None,
    attempt: int,
    hooks: JobHooks,
    workdir: Path,
) -> str:
    from core.errors import MethodInputError, NonFiniteError
    from core.training.progress import StopTraining

    attempt_prefix = f"{job_prefix(job.tenant_id, job.id)}/attempt-{attempt}"
    try:
        artifact = train_and_store(settings, storage, job, dataset, hooks, workdir, attempt_prefix)
        hooks.heartbeat.flush()  # the upload's final count, which the heartbeat may be holding back
        outcome = _finish(settings, job.id, attempt, JobStatus.succeeded, artifact=artifact)
        if outcome == "lease_lost":
            _discard(storage, attempt_prefix)  # another attempt owns the job now
        return outcome
    except StopTraining as stop:
        _discard(storage, attempt_prefix)
        if stop.reason == "canceled":
            return _finish(settings, job.id, attempt, JobStatus.canceled)
        if stop.reason == "shutdown":
            log.info("job %s attempt %s stopped: the worker is shutting down", job.id, attempt)
            return hand_back(settings=settings, job_id=job.id, attempt=attempt)
        log.warning("job %s attempt %s lost its lease; stopping", job.id, attempt)
        return "lease_lost"
    except jobs.LeaseLost:
        _discard(storage, attempt_prefix)
        return "lease_lost"
    except (PermanentJobError, MethodInputError, NonFiniteError) as exc:
        # NonFiniteError: a retry replays the same seeded steps into the same divergence.
        _discard(storage, attempt_prefix)
        return _finish(settings, job.id, attempt, JobStatus.failed, code=exc.code, message=str(exc))
    except Exception as exc:
        _discard(storage, attempt_prefix)
        code = _classify(exc)
        if code == "gpu_oom":
            return _finish(settings, job.id, attempt, JobStatus.failed, code=code, message=str(exc)[:2000])
        log.exception("job %s attempt %s failed; releasing it for a retry", job.id, attempt)
        return _release(settings, job.id, attempt, code, f"{type(exc).__name__}: {exc}"[:2000])


def _discard(storage: Storage, prefix: str) -> None:
    """Delete an ended attempt's partial artifact. A storage failure (S3 down) is logged, not raised:
    raised here it would hide why the attempt ended and skip handing the job on. No row names the
    folder, and deleting the job removes it."""
    try:
        storage.delete_prefix(prefix + "/")
    except StorageError:
        log.warning("could not delete %s; deleting the job removes it", prefix, exc_info=True)


def _classify(exc: Exception) -> str:
    name = type(exc).__name__
    return "gpu_oom" if name == "OutOfMemoryError" else "training_error"


def _finish(
    settings: Settings,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    artifact: jobs.ArtifactRecord | None = None,
    code: str | None = None,
    message: str | None = None,
) -> str:
    try:
        with session_scope(settings.database_url) as session:
            jobs.finish(
                session=session,
                job_id=job_id,
                attempt=attempt,
                status=status,
                artifact=artifact,
                error_code=code,
                error_message=message,
            )
    except jobs.LeaseLost:
        log.warning("job %s attempt %s finished after losing its lease; result dropped", job_id, attempt)
        return "lease_lost"
    return str(status)


def _release(settings: Settings, job_id: str, attempt: int, code: str, message: str) -> str:
    try:
        with session_scope(settings.database_url) as session:
            status = jobs.release(
                session=session, job_id=job_id, attempt=attempt, error_code=code, error_message=message
            )
    except jobs.LeaseLost:
        return "lease_lost"
    if status == JobStatus.queued:
        dispatch.send_train(job_id)
    return str(status)


def hand_back(*, settings: Settings, job_id: str, attempt: int) -> str:
    """Give a running attempt back because its worker stops: queued again at once and re-sent, so
    the next worker resumes it from its newest checkpoint."""
    try:
        with session_scope(settings.database_url) as session:
            status = jobs.hand_back(session=session, job_id=job_id, attempt=attempt, reason="worker_shutdown")
    except jobs.LeaseLost:
        return "lease_lost"
    if status != JobStatus.queued:
        return str(status)
    try:
        dispatch.send_train(job_id)
    except Exception:
        # The broker is down: the reaper re-sends queued jobs whose message may be lost.
        log.warning("job %s handed back but not re-sent; the reaper re-sends it", job_id, exc_info=True)
        return "handed_back"
    with session_scope(settings.database_url) as session:
        jobs.mark_dispatched(session=session, job_id=job_id)
    return "handed_back"
