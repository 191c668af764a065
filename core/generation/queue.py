"""The doorbell of a generation, and its reconciler (the same pattern as jobs' in core/jobs/states.py).

A generation row is committed before its message is sent, and its claim (queued → running) is
conditional, so sending a message twice is harmless while sending none leaves it queued forever:
the API crashing between commit and send, a Redis broker restarted empty, a message lost in
transport. The reaper re-sends the ones whose message may be gone. Torch-free: the API records
each send.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Generation, JobStatus
from core.timeutil import utcnow


def mark_dispatched(*, session: Session, generation_id: str) -> None:
    session.execute(update(Generation).where(Generation.id == generation_id).values(dispatched_at=utcnow()))
    session.commit()


def undispatched(*, session: Session, older_than_s: float) -> list[str]:
    """Queued generations not sent, or last sent, more than `older_than_s` ago, oldest first."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = session.scalars(
        select(Generation.id)
        .where(
            Generation.status == JobStatus.queued,
            (Generation.dispatched_at.is_(None) & (Generation.created_at < cutoff))
            | (Generation.dispatched_at < cutoff),
        )
        .order_by(Generation.created_at)
    )
    return list(rows)
