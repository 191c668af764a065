"""Which queued job a free training worker runs next: the database decides, fairly across tenants.

A train message is a doorbell ("a job is waiting"), not an order to run one job: the worker that
takes it claims the next job by this rule, so a tenant's backlog of messages ahead in the broker's
queue cannot hold back another tenant's job.

1. Only tenants below their running-jobs limit (core/tenants/limits.py) are eligible.
2. The tenant with the fewest running jobs goes first; ties go to the tenant served least recently
   (whose newest job start is oldest; never served comes first), so equal backlogs alternate;
   then to the tenant whose oldest waiting job is older.
3. Within the tenant: the oldest job first.

The decision is serialised by one transaction-scoped lock (PostgreSQL advisory lock; SQLite writes
one at a time): two workers claiming at once see each other's claim, so neither the order nor a
tenant's cap can be broken by a race. A claim takes milliseconds and happens once per job start,
so the lock costs nothing measurable. The claim itself is jobs.claim: the same fenced, conditional
UPDATE as before, so duplicate messages, cancel and the attempt limit behave as they did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core.config import Settings
from core.jobs import states as jobs
from core.models import Job, JobStatus
from core.tenants.limits import limits_of

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key for "deciding the next claim" (any constant; it names nothing else).
CLAIM_LOCK_KEY = 0x61746C_636C6D  # "atl" "clm"


@dataclass(frozen=True)
class Claimed:
    job_id: str
    attempt: int
    tenant_id: str


def _claimable():  # type: ignore[no-untyped-def]
    return (
        (Job.status == JobStatus.queued) & Job.cancel_requested.is_(False) & (Job.attempt < Job.max_attempts)
    )


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
    else:
        # SQLite: a write takes the database's one write lock until commit, even when no row matches.
        session.execute(text("UPDATE jobs SET id = id WHERE 0"))


def tenant_order(*, session: Session, settings: Settings) -> list[str]:
    """Tenants with a claimable job, best first, leaving out those at their running-jobs limit."""
    oldest: dict[str, datetime] = dict(
        session.execute(
            select(Job.tenant_id, func.min(Job.created_at)).where(_claimable()).group_by(Job.tenant_id)
        ).all()
    )
    waiting = list(oldest)
    if not waiting:
        return []
    running = dict(
        session.execute(
            select(Job.tenant_id, func.count())
            .where(Job.status == JobStatus.running, Job.tenant_id.in_(waiting))
            .group_by(Job.tenant_id)
        ).all()
    )
    served: dict[str, datetime | None] = dict(
        session.execute(
            select(Job.tenant_id, func.max(Job.started_at))
            .where(Job.tenant_id.in_(waiting))
            .group_by(Job.tenant_id)
        ).all()
    )
    limits = limits_of(session=session, settings=settings, tenant_ids=waiting)
    eligible = [t for t in waiting if running.get(t, 0) < limits[t].max_running_jobs]
    never = datetime.min
    return sorted(eligible, key=lambda t: (running.get(t, 0), served.get(t) or never, oldest[t], t))


def _next_job(session: Session, tenant_id: str) -> str | None:
    query = (
        select(Job.id)
        .where(_claimable(), Job.tenant_id == tenant_id)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    )
    # A row locked by a concurrent cancel is passed over rather than waited for.
    return session.scalar(query.with_for_update(skip_locked=True))


def claim_next(*, session: Session, settings: Settings, worker_id: str) -> Claimed | None:
    """Claim the next job by the fair rule (queued → running); None when nothing may start now."""
    _lock(session)
    for tenant_id in tenant_order(session=session, settings=settings):
        job_id = _next_job(session, tenant_id)
        if job_id is None:
            continue
        # jobs.claim commits, which also releases the lock: the next claimer sees this one.
        attempt = jobs.claim(session=session, job_id=job_id, worker_id=worker_id, lease_s=settings.lease_s)
        if attempt is None:
            return None
        return Claimed(job_id=job_id, attempt=attempt, tenant_id=tenant_id)
    session.rollback()
    return None


def next_waiting(*, session: Session, tenant_id: str) -> str | None:
    """The tenant's oldest claimable job, if any."""
    query = select(Job.id).where(_claimable(), Job.tenant_id == tenant_id).order_by(Job.created_at, Job.id)
    return session.scalar(query.limit(1))
