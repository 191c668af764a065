"""Which queued generations the reaper re-sends: those never sent or last sent long ago, and no
others (a fresh or recently sent one's message is probably on its way; a running one is claimed)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from core.generation import queue as generation_queue
from core.ids import new_id
from core.models import Generation, JobStatus
from core.timeutil import utcnow
from tests.db_fixtures import make_tenant


def _generation(
    session: Session, tenant_id: str, *, created_s: float, dispatched_s: float | None, status: str = "queued"
) -> str:
    now = utcnow()
    row = Generation(
        id=new_id("gen"),
        tenant_id=tenant_id,
        spec={"base_model": "tiny-sd", "prompt": "a photo"},
        status=status,
        created_at=now - timedelta(seconds=created_s),
        dispatched_at=None if dispatched_s is None else now - timedelta(seconds=dispatched_s),
    )
    session.add(row)
    session.commit()
    return row.id


def test_undispatched_generations_are_the_ones_whose_message_may_be_lost(db_session: Session) -> None:
    tenant_id = make_tenant(db_session)
    never_sent = _generation(db_session, tenant_id, created_s=600, dispatched_s=None)
    sent_long_ago = _generation(db_session, tenant_id, created_s=500, dispatched_s=400)
    _generation(db_session, tenant_id, created_s=5, dispatched_s=None)  # fresh
    _generation(db_session, tenant_id, created_s=600, dispatched_s=10)  # sent recently
    _generation(db_session, tenant_id, created_s=600, dispatched_s=None, status=JobStatus.running)

    assert generation_queue.undispatched(session=db_session, older_than_s=120) == [never_sent, sent_long_ago]
    generation_queue.mark_dispatched(session=db_session, generation_id=never_sent)
    assert generation_queue.undispatched(session=db_session, older_than_s=120) == [sent_long_ago]
