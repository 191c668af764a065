"""The generation state machine (core/generation/states.py) on SQLite and PostgreSQL: a claim per
attempt, a lease the worker's heartbeat renews, fenced finishes, cancel, and a reaper that re-queues
a generation whose worker died, a bounded number of times, then fails it `worker_lost`; and the
migration that gave generations their lease.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.db import MIGRATIONS_DIR, get_engine, session_scope, upgrade
from core.generation import states as generation_states
from core.ids import new_id
from core.models import JobStatus
from core.timeutil import utcnow
from tests.db_fixtures import make_tenant
from tests.generation_fixtures import add_generation, claim_now, expire_lease, fresh_row


def test_a_claim_starts_one_attempt_and_a_duplicate_message_does_nothing(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    before = utcnow()
    assert claim_now(db_session, generation_id, worker_id="host:41") == 1
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.attempt, row.worker_id) == (JobStatus.running, 1, "host:41")
    assert row.lease_expires_at is not None and row.lease_expires_at > before + timedelta(seconds=59)
    assert row.started_at is not None and row.started_at >= before
    # A message delivered again (the worker's death re-queues it in Redis) finds it running.
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:2", lease_s=60)
        is None
    )
    assert fresh_row(db_session, generation_id).attempt == 1


def test_the_heartbeat_renews_the_lease_and_reads_the_cancel_flag(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    attempt = claim_now(db_session, generation_id)
    expire_lease(db_session, generation_id)
    beat = {"session": db_session, "generation_id": generation_id, "attempt": attempt, "lease_s": 30}
    assert generation_states.heartbeat(**beat) is False
    lease = fresh_row(db_session, generation_id).lease_expires_at
    assert lease is not None and lease > utcnow() + timedelta(seconds=25)
    # The reaper leaves a live lease alone.
    assert generation_states.reap_stale(session=db_session) == []
    row = generation_states.request_cancel(
        session=db_session, generation=fresh_row(db_session, generation_id)
    )
    assert (row.status, row.cancel_requested) == (JobStatus.running, True)
    assert generation_states.heartbeat(**beat) is True


def test_a_reaped_attempt_is_fenced_out_and_the_next_one_finishes(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    first = claim_now(db_session, generation_id, worker_id="host:1")
    expire_lease(db_session, generation_id)

    assert generation_states.reap_stale(session=db_session) == [generation_id]
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.attempt, row.worker_id, row.lease_expires_at) == ("queued", 1, None, None)
    assert row.dispatched_at is None  # the reconciler re-sends it should the reaper's send be lost
    with pytest.raises(generation_states.LeaseLost):
        generation_states.heartbeat(
            session=db_session, generation_id=generation_id, attempt=first, lease_s=60
        )

    second = claim_now(db_session, generation_id, worker_id="host:2")
    assert second == 2
    # The first worker was only slow: its finish matches nothing and records none of its images.
    with pytest.raises(generation_states.LeaseLost):
        generation_states.finish(
            session=db_session,
            generation_id=generation_id,
            attempt=first,
            status=JobStatus.succeeded,
            image_keys=["stale.png"],
        )
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.attempt) == ("running", 2)
    generation_states.finish(
        session=db_session,
        generation_id=generation_id,
        attempt=second,
        status=JobStatus.succeeded,
        image_keys=["attempt-2/0.png"],
    )
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.image_keys, row.worker_id) == ("succeeded", ["attempt-2/0.png"], "host:2")
    assert row.finished_at is not None and row.lease_expires_at is None
    # Finished is final: the first attempt cannot finish it again either.
    with pytest.raises(generation_states.LeaseLost):
        generation_states.finish(
            session=db_session, generation_id=generation_id, attempt=second, status=JobStatus.failed
        )


def test_attempts_are_bounded_then_the_generation_fails_worker_lost(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session), max_attempts=2)
    claim_now(db_session, generation_id)
    expire_lease(db_session, generation_id)
    assert generation_states.reap_stale(session=db_session) == [generation_id]
    assert claim_now(db_session, generation_id) == 2
    expire_lease(db_session, generation_id)

    assert generation_states.reap_stale(session=db_session) == []
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.error_code, row.attempt) == ("failed", generation_states.WORKER_LOST, 2)
    assert row.error_message is not None and "2 attempts" in row.error_message
    assert row.finished_at is not None and row.lease_expires_at is None
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:3", lease_s=60)
        is None
    )


def test_cancel_of_a_queued_generation_is_final(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    row = generation_states.request_cancel(
        session=db_session, generation=fresh_row(db_session, generation_id)
    )
    assert (row.status, row.cancel_requested) == ("canceled", True)
    assert row.finished_at is not None
    # Its message still arrives: the claim refuses it.
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:1", lease_s=60)
        is None
    )
    assert fresh_row(db_session, generation_id).status == "canceled"


def test_a_canceled_generation_whose_worker_died_ends_canceled_not_retried(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    claim_now(db_session, generation_id)
    generation_states.request_cancel(session=db_session, generation=fresh_row(db_session, generation_id))
    expire_lease(db_session, generation_id)
    assert generation_states.reap_stale(session=db_session) == []
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.attempt, row.error_code) == ("canceled", 1, None)


def test_the_migration_lets_the_reaper_free_generations_stuck_running(db_url: str) -> None:
    """A generation running before 0008 has no lease: its worker is gone for good, and without one
    it would stay running, and its artifacts undeletable, for ever."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db_url)
    get_engine(db_url).dispose()
    command.downgrade(cfg, "0007")
    with session_scope(db_url) as session:
        tenant_id = make_tenant(session)
    table = sa.table(
        "generations",
        *(sa.column(name) for name in ("id", "tenant_id", "status", "attempt", "created_at", "started_at")),
        sa.column("spec", sa.JSON),
    )
    an_hour_ago = utcnow() - timedelta(hours=1)
    stuck = new_id("gen")
    with get_engine(db_url).begin() as conn:
        conn.execute(
            table.insert().values(
                id=stuck,
                tenant_id=tenant_id,
                spec={"base_model": "tiny-sd", "prompt": "old"},
                status="running",
                attempt=1,
                created_at=an_hour_ago,
                started_at=an_hour_ago,
            )
        )
    get_engine(db_url).dispose()
    upgrade(db_url)

    with session_scope(db_url) as session:
        row = fresh_row(session, stuck)
        assert (row.max_attempts, row.cancel_requested, row.lease_expires_at) == (3, False, an_hour_ago)
        assert generation_states.reap_stale(session=session) == [stuck]
        assert fresh_row(session, stuck).status == "queued"
