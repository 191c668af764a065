"""The job state machine of design.md §4, on SQLite and PostgreSQL (the `db_url` fixture runs each twice).

Each step opens its own session, as the API, a worker and the reaper are separate processes that
share nothing but the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import MIGRATIONS_DIR, get_engine, new_session, session_scope, upgrade
from core.jobs import creation
from core.jobs import states as jobs
from core.jobs.creation import IdempotencyConflict
from core.jobs.states import ArtifactRecord, LeaseLost
from core.models import Artifact, Base, Job, JobEvent, JobStatus
from core.timeutil import utcnow
from tests.db_fixtures import insert_dataset, lora_spec, make_tenant

LEASE_S = 60.0
MANIFEST = {
    "method": "lora",
    "files": [{"name": "pytorch_lora_weights.safetensors"}],
    "metrics": {"final_loss": 0.125},
}


@dataclass
class Machine:
    """One job in a database, driven through core.jobs.states one session per call."""

    url: str
    job_id: str

    def run(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        with session_scope(self.url) as session:
            return fn(session=session, job_id=self.job_id, **kwargs)

    def row(self) -> Job:
        with new_session(self.url) as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            return job

    def events(self) -> list[tuple[str, int]]:
        with new_session(self.url) as session:
            rows = session.scalars(
                select(JobEvent).where(JobEvent.job_id == self.job_id).order_by(JobEvent.id)
            )
            return [(e.type, e.attempt) for e in rows]

    def set(self, **values: Any) -> None:
        """Write columns directly, to stage what time or a dead worker would leave behind."""
        with session_scope(self.url) as session:
            session.execute(update(Job).where(Job.id == self.job_id).values(**values))


def new_job(url: str, *, max_attempts: int = 3) -> Machine:
    with session_scope(url) as session:
        tenant_id = make_tenant(session)
        spec = lora_spec(insert_dataset(session, tenant_id))
        job, created = creation.create_job(
            session=session, tenant_id=tenant_id, spec=spec, idempotency_key=None, max_attempts=max_attempts
        )
        assert created
        return Machine(url, job.id)


@pytest.fixture
def machine(db_url: str) -> Machine:
    return new_job(db_url)


# --- steps: each drives one transition; the table below composes them -----------------------------

Step = Callable[[Machine], Any]


def claim(m: Machine) -> Any:
    return m.run(jobs.claim, worker_id="w1", lease_s=LEASE_S)


def heartbeat(attempt: int) -> Step:
    return lambda m: m.run(jobs.heartbeat, attempt=attempt, lease_s=LEASE_S, step=1, loss=0.5)


def checkpoint(attempt: int) -> Step:
    return lambda m: m.run(jobs.record_checkpoint, attempt=attempt, step=5, key="jobs/x/checkpoints/5")


def finish(attempt: int, status: JobStatus = JobStatus.succeeded) -> Step:
    artifact = ArtifactRecord(storage_prefix="jobs/x/attempt-1", manifest=MANIFEST)
    return lambda m: m.run(
        jobs.finish, attempt=attempt, status=status, artifact=artifact if status == "succeeded" else None
    )


def release(attempt: int) -> Step:
    return lambda m: m.run(jobs.release, attempt=attempt, error_code="oom", error_message="out of memory")


def cancel(m: Machine) -> Any:
    with session_scope(m.url) as session:
        job = session.get(Job, m.job_id)
        assert job is not None
        return JobStatus(jobs.request_cancel(session=session, job=job).status)


def flag_cancel(m: Machine) -> None:
    # Not reachable through request_cancel today; claim's guard must hold whatever path sets the flag.
    m.set(cancel_requested=True)


def expire(m: Machine) -> None:
    m.set(lease_expires_at=utcnow() - timedelta(seconds=1))


def reap(m: Machine) -> list[str]:
    with session_scope(m.url) as session:
        return jobs.reap_stale(session=session)


class ArtifactId:
    """Equal to any artifact id: finish() makes a fresh one."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith("art_")

    def __repr__(self) -> str:
        return "<an artifact id>"


@dataclass(frozen=True)
class Case:
    id: str
    given: tuple[Step, ...]  # each must succeed: it stages the state the transition starts from
    when: Step
    expect: Any  # the transition's return value, or the exception type it must raise
    status: JobStatus
    attempt: int


def twice(step: Step) -> tuple[Step, ...]:
    return (step, step)


CASES = [
    Case("claim queued -> running, attempt 1", (), claim, 1, JobStatus.running, 1),
    Case("second claim is not ours", (claim,), claim, None, JobStatus.running, 1),
    Case("heartbeat of the owner: no cancel", (claim,), heartbeat(1), False, JobStatus.running, 1),
    Case("heartbeat of a stale attempt", (claim,), heartbeat(2), LeaseLost, JobStatus.running, 1),
    Case("heartbeat of a queued job", (), heartbeat(0), LeaseLost, JobStatus.queued, 0),
    Case("checkpoint of the owner", (claim,), checkpoint(1), None, JobStatus.running, 1),
    Case("checkpoint of a stale attempt", (claim,), checkpoint(2), LeaseLost, JobStatus.running, 1),
    Case("finish succeeded with an artifact", (claim,), finish(1), ArtifactId(), JobStatus.succeeded, 1),
    Case("finish failed", (claim,), finish(1, JobStatus.failed), None, JobStatus.failed, 1),
    Case("finish by a stale attempt", (claim,), finish(2), LeaseLost, JobStatus.running, 1),
    Case("finish twice", (claim, finish(1)), finish(1), LeaseLost, JobStatus.succeeded, 1),
    Case("heartbeat after finish", (claim, finish(1)), heartbeat(1), LeaseLost, JobStatus.succeeded, 1),
    Case("cancel queued -> canceled at once", (), cancel, JobStatus.canceled, JobStatus.canceled, 0),
    Case("claim after cancel while queued", (cancel,), claim, None, JobStatus.canceled, 0),
    Case("cancel running -> only a flag", (claim,), cancel, JobStatus.running, JobStatus.running, 1),
    Case("heartbeat reads the cancel flag", (claim, cancel), heartbeat(1), True, JobStatus.running, 1),
    Case(
        "worker acknowledges the cancel",
        (claim, cancel),
        finish(1, JobStatus.canceled),
        None,
        JobStatus.canceled,
        1,
    ),
    Case("cancel a finished job changes nothing", (claim, finish(1)), cancel, "succeeded", "succeeded", 1),
    Case("release -> queued", (claim,), release(1), JobStatus.queued, JobStatus.queued, 1),
    Case("claim after release -> attempt 2", (claim, release(1)), claim, 2, JobStatus.running, 2),
    Case(
        "release of a cancel-requested job -> canceled",
        (claim, cancel),
        release(1),
        JobStatus.canceled,
        JobStatus.canceled,
        1,
    ),
    Case("claim refuses a queued job flagged for cancel", (flag_cancel,), claim, None, JobStatus.queued, 0),
    Case("release by a stale attempt", (claim,), release(2), LeaseLost, JobStatus.running, 1),
    Case(
        "release of the last attempt -> failed",
        (claim, release(1), claim, release(2), claim),
        release(3),
        JobStatus.failed,
        JobStatus.failed,
        3,
    ),
    Case(
        "claim after the last attempt failed",
        (claim, release(1), claim, release(2), claim, release(3)),
        claim,
        None,
        JobStatus.failed,
        3,
    ),
    Case("reap an expired lease -> queued", (claim, expire), reap, "job-id", JobStatus.queued, 1),
    Case("reap leaves a live lease alone", (claim,), reap, [], JobStatus.running, 1),
    Case("reap a canceled stale job -> canceled", (claim, cancel, expire), reap, [], JobStatus.canceled, 1),
    Case("claim after reaping -> attempt 2", (claim, expire, reap), claim, 2, JobStatus.running, 2),
    Case("reaped job's old heartbeat", (claim, expire, reap), heartbeat(1), LeaseLost, JobStatus.queued, 1),
    Case("reaped job's old checkpoint", (claim, expire, reap), checkpoint(1), LeaseLost, JobStatus.queued, 1),
    Case("reaped job's old finish", (claim, expire, reap), finish(1), LeaseLost, JobStatus.queued, 1),
    Case(
        "old attempt after the job was reclaimed",
        (claim, expire, reap, claim),
        finish(1),
        LeaseLost,
        JobStatus.running,
        2,
    ),
    Case(
        "reap the last attempt -> failed",
        (claim, release(1), claim, release(2), claim, expire),
        reap,
        [],
        JobStatus.failed,
        3,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_transition(machine: Machine, case: Case) -> None:
    for step in case.given:
        step(machine)
    expect = [machine.job_id] if case.expect == "job-id" else case.expect
    if isinstance(expect, type) and issubclass(expect, Exception):
        with pytest.raises(expect):
            case.when(machine)
    else:
        assert case.when(machine) == expect
    row = machine.row()
    assert (row.status, row.attempt) == (case.status, case.attempt)


def test_claim_takes_the_lease(machine: Machine) -> None:
    before = utcnow()
    assert claim(machine) == 1
    row = machine.row()
    assert row.worker_id == "w1"
    assert row.started_at is not None and row.started_at >= before
    assert row.lease_expires_at is not None
    assert (
        before + timedelta(seconds=LEASE_S - 5) < row.lease_expires_at < utcnow() + timedelta(seconds=LEASE_S)
    )
    assert machine.events() == [("created", 0), ("started", 1)]


def test_concurrent_claims_have_one_winner(machine: Machine) -> None:
    # The compare-and-set UPDATE must hold under real concurrency, not only one call after another.
    results: list[int | None] = []
    barrier = threading.Barrier(4)

    def contender() -> None:
        barrier.wait()
        results.append(claim(machine))

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results, key=lambda r: r or 0) == [None, None, None, 1]
    assert machine.row().attempt == 1


def test_heartbeat_renews_the_lease_and_records_progress(machine: Machine) -> None:
    claim(machine)
    machine.set(lease_expires_at=utcnow() + timedelta(seconds=2))
    canceled = machine.run(jobs.heartbeat, attempt=1, lease_s=600, step=7, loss=0.25, images_per_s=3.5)
    assert canceled is False
    row = machine.row()
    assert (row.step, row.loss, row.images_per_s) == (7, 0.25, 3.5)
    assert row.lease_expires_at is not None
    assert row.lease_expires_at > utcnow() + timedelta(seconds=590)

    # A heartbeat without progress renews the lease and keeps the last progress.
    machine.run(jobs.heartbeat, attempt=1, lease_s=LEASE_S)
    assert machine.row().step == 7


def test_record_checkpoint_points_at_the_checkpoint(machine: Machine) -> None:
    claim(machine)
    machine.run(jobs.record_checkpoint, attempt=1, step=40, key="jobs/j/checkpoints/40")
    row = machine.row()
    assert (row.checkpoint_step, row.checkpoint_key) == (40, "jobs/j/checkpoints/40")
    with pytest.raises(LeaseLost):
        machine.run(jobs.record_checkpoint, attempt=2, step=50, key="jobs/j/checkpoints/50")
    assert machine.row().checkpoint_step == 40


def test_finish_commits_the_artifact_with_the_job(machine: Machine) -> None:
    claim(machine)
    artifact_id = finish(1)(machine)
    row = machine.row()
    assert row.artifact_id == artifact_id
    assert row.finished_at is not None and row.lease_expires_at is None
    # A job shorter than one heartbeat never reported progress: the final loss comes with the artifact.
    assert row.loss == 0.125 and row.step == row.total_steps
    with new_session(machine.url) as session:
        artifact = session.get(Artifact, artifact_id)
        assert artifact is not None
        assert (artifact.job_id, artifact.tenant_id, artifact.method, artifact.base_model) == (
            machine.job_id,
            row.tenant_id,
            "lora",
            "tiny-sd",
        )
        assert artifact.manifest == MANIFEST
    assert machine.events()[-1] == ("succeeded", 1)


def test_finish_is_one_transaction(machine: Machine) -> None:
    # If the artifact row cannot be written, the job must not be marked succeeded without it.
    claim(machine)
    row = machine.row()
    with session_scope(machine.url) as session:
        session.add(
            Artifact(
                id="art_squatter",
                tenant_id=row.tenant_id,
                job_id=machine.job_id,
                method="lora",
                base_model="tiny-sd",
                storage_prefix="elsewhere",
                manifest={},
            )
        )
    with pytest.raises(IntegrityError):
        finish(1)(machine)
    row = machine.row()
    assert (row.status, row.artifact_id) == (JobStatus.running, None)
    assert ("succeeded", 1) not in machine.events()


def test_release_after_max_attempts_records_the_error(db_url: str) -> None:
    m = new_job(db_url, max_attempts=1)
    claim(m)
    assert release(1)(m) == JobStatus.failed
    row = m.row()
    assert row.error_code == "oom"
    assert row.error_message is not None and "1 attempts" in row.error_message
    assert m.events()[-1] == ("failed", 1)


def test_reap_requeues_with_a_reason(machine: Machine) -> None:
    claim(machine)
    expire(machine)
    assert reap(machine) == [machine.job_id]
    row = machine.row()
    assert (row.worker_id, row.lease_expires_at, row.dispatched_at) == (None, None, None)
    assert machine.events()[-1] == ("requeued", 1)


def test_reap_reads_the_database_not_the_session(machine: Machine) -> None:
    # A long-lived session that loaded the job before it was claimed must not reap with stale values.
    with new_session(machine.url) as session:
        cached = session.get(Job, machine.job_id)  # held: the identity map keeps only live objects
        assert cached is not None and cached.attempt == 0
        claim(machine)
        expire(machine)
        assert jobs.reap_stale(session=session) == [machine.job_id]
    assert machine.row().status == JobStatus.queued


def _age(m: Machine, *, created_s: float, dispatched_s: float | None) -> None:
    now = utcnow()
    m.set(
        created_at=now - timedelta(seconds=created_s),
        dispatched_at=None if dispatched_s is None else now - timedelta(seconds=dispatched_s),
    )


def test_undispatched_finds_queued_jobs_whose_doorbell_was_lost(db_url: str) -> None:
    never_sent = new_job(db_url)
    _age(never_sent, created_s=600, dispatched_s=None)
    sent_long_ago = new_job(db_url)
    _age(sent_long_ago, created_s=600, dispatched_s=500)
    fresh = new_job(db_url)  # just created, its message is probably on its way
    sent_recently = new_job(db_url)
    _age(sent_recently, created_s=600, dispatched_s=10)
    running = new_job(db_url)
    _age(running, created_s=600, dispatched_s=None)
    claim(running)

    with new_session(db_url) as session:
        found = jobs.undispatched(session=session, older_than_s=120)
        assert sorted(found) == sorted([never_sent.job_id, sent_long_ago.job_id])
        jobs.mark_dispatched(session=session, job_id=never_sent.job_id)
        assert jobs.undispatched(session=session, older_than_s=120) == [sent_long_ago.job_id]
    assert fresh.row().status == JobStatus.queued


def test_idempotent_create(db_session: Session) -> None:
    tenant_id = make_tenant(db_session)
    dataset_id = insert_dataset(db_session, tenant_id)

    def create(spec: Any, key: str | None, tenant: str = tenant_id) -> tuple[Job, bool]:
        return creation.create_job(
            session=db_session, tenant_id=tenant, spec=spec, idempotency_key=key, max_attempts=3
        )

    first, created = create(lora_spec(dataset_id), "key-1")
    assert created
    again, created = create(lora_spec(dataset_id), "key-1")
    assert (again.id, created) == (first.id, False)
    with pytest.raises(IdempotencyConflict) as conflict:
        create(lora_spec(dataset_id, max_steps=11), "key-1")
    assert conflict.value.job_id == first.id

    # Keys belong to a tenant, and no key means no deduplication.
    other_tenant = make_tenant(db_session)
    other_dataset = insert_dataset(db_session, other_tenant)
    assert create(lora_spec(other_dataset), "key-1", other_tenant)[1] is True
    assert create(lora_spec(dataset_id), None)[1] is True
    assert create(lora_spec(dataset_id), None)[1] is True
    assert db_session.query(Job).filter(Job.tenant_id == tenant_id).count() == 3


@pytest.mark.parametrize(
    ("status", "terminal"),
    [("queued", False), ("running", False), ("succeeded", True), ("failed", True), ("canceled", True)],
)
def test_is_terminal(status: str, terminal: bool) -> None:
    assert JobStatus(status).is_terminal is terminal


def test_migrations_build_the_models_schema(db_url: str) -> None:
    # db_url was built by `upgrade`; what it built must be exactly what the models declare.
    engine = get_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == _head_revision()
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}


def test_migrations_downgrade_and_upgrade_again(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db_url)
    get_engine(db_url).dispose()  # SQLite cannot drop tables under an open connection's feet
    command.downgrade(cfg, "base")
    assert set(inspect(get_engine(db_url)).get_table_names()) <= {"alembic_version"}
    upgrade(db_url)
    upgrade(db_url)  # idempotent: a second start of the API must not fail
    assert set(Base.metadata.tables) <= set(inspect(get_engine(db_url)).get_table_names())
    assert new_job(db_url).row().status == JobStatus.queued


def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def test_timestamps_are_naive_utc(machine: Machine) -> None:
    # Both databases must hand back the same naive UTC values, or lease comparisons drift by hours.
    claim(machine)
    row = machine.row()
    assert isinstance(row.lease_expires_at, datetime)
    assert row.lease_expires_at.tzinfo is None
    assert abs((row.lease_expires_at - utcnow()).total_seconds() - LEASE_S) < 30
