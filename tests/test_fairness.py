"""Fair scheduling across tenants (core/jobs/scheduling.py): which job a free worker claims next, and the
running-jobs cap under concurrent claims. Workers are simulated at the claim, on SQLite and on a
real PostgreSQL: the decision lives in the database, so that is where it is tested."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import new_session, session_scope
from core.jobs import creation, scheduling
from core.jobs import states as jobs
from core.models import Job, JobStatus
from core.tenants.limits import set_overrides
from tests.db_fixtures import insert_dataset, lora_spec, make_tenant


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", tenant_max_running_jobs=4)


def submit(session: Session, tenant_id: str, count: int) -> list[str]:
    dataset_id = insert_dataset(session, tenant_id)
    return [
        creation.create_job(
            session=session,
            tenant_id=tenant_id,
            spec=lora_spec(dataset_id),
            idempotency_key=None,
            max_attempts=3,
        )[0].id
        for _ in range(count)
    ]


def claim(db_url: str, settings: Settings, worker: str) -> scheduling.Claimed | None:
    with session_scope(db_url) as session:
        return scheduling.claim_next(session=session, settings=settings, worker_id=worker)


def succeed(db_url: str, claimed: scheduling.Claimed) -> None:
    with session_scope(db_url) as session:
        jobs.finish(
            session=session, job_id=claimed.job_id, attempt=claimed.attempt, status=JobStatus.succeeded
        )


def run_workers(db_url: str, settings: Settings, workers: int, name: Callable[[str], str]) -> list[str]:
    """Simulated workers, each running one job at a time; they finish in the order they started.
    Returns the start order, named by `name(job_id)`."""
    order: list[str] = []
    running: list[scheduling.Claimed] = []
    while True:
        while len(running) < workers and (claimed := claim(db_url, settings, f"w{len(running)}")) is not None:
            running.append(claimed)
            order.append(name(claimed.job_id))
        if not running:
            return order
        succeed(db_url, running.pop(0))


def test_one_tenants_backlog_does_not_hold_back_another(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    """The issue's scenario: two workers, tenant A submits 20 jobs, then tenant B one."""
    a, b = make_tenant(db_session, "a"), make_tenant(db_session, "b")
    a_jobs = submit(db_session, a, 20)
    (b_job,) = submit(db_session, b, 1)
    names = {job_id: f"A{i + 1}" for i, job_id in enumerate(a_jobs)} | {b_job: "B1"}

    order = run_workers(db_url, settings, workers=2, name=names.__getitem__)

    print("start order:", " ".join(order))  # recorded in the closing note
    assert order.index("B1") < order.index("A3")
    assert order[:3] == ["A1", "B1", "A2"]
    assert sorted(order) == sorted(names.values())  # every job ran exactly once
    assert [n for n in order if n.startswith("A")] == [f"A{i}" for i in range(1, 21)]  # age within a tenant


def test_equal_backlogs_alternate_on_one_worker(db_session: Session, db_url: str, settings: Settings) -> None:
    """With one worker neither tenant ever has a job running at a claim: the tenant served least
    recently goes next, so the older backlog does not run to the end first."""
    a, b = make_tenant(db_session, "a"), make_tenant(db_session, "b")
    names = {job_id: f"A{i + 1}" for i, job_id in enumerate(submit(db_session, a, 3))}
    names |= {job_id: f"B{i + 1}" for i, job_id in enumerate(submit(db_session, b, 3))}

    order = run_workers(db_url, settings, workers=1, name=names.__getitem__)

    assert order == ["A1", "B1", "A2", "B2", "A3", "B3"]


def test_between_tenants_never_served_the_older_waiting_job_goes_first(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    b = make_tenant(db_session, "b")  # the older tenant, but its job comes later
    a = make_tenant(db_session, "a")
    (a_job,) = submit(db_session, a, 1)
    (b_job,) = submit(db_session, b, 1)
    first, second = claim(db_url, settings, "w1"), claim(db_url, settings, "w2")
    assert first is not None and second is not None
    assert (first.job_id, second.job_id) == (a_job, b_job)


def test_running_cap_holds_jobs_back_and_lets_others_through(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    a, b = make_tenant(db_session, "a"), make_tenant(db_session, "b")
    set_overrides(session=db_session, tenant_id=a, values={"max_running_jobs": 1})
    a_jobs = submit(db_session, a, 3)
    (b_job,) = submit(db_session, b, 1)

    first = claim(db_url, settings, "w1")
    second = claim(db_url, settings, "w2")
    third = claim(db_url, settings, "w3")

    assert first is not None and first.job_id == a_jobs[0]
    assert second is not None and second.job_id == b_job  # A is at its cap of 1
    assert third is None  # A's other jobs wait, although three workers are free
    succeed(db_url, first)
    after = claim(db_url, settings, "w1")
    assert after is not None and after.job_id == a_jobs[1]


def test_a_default_cap_from_settings_applies_without_overrides(db_session: Session, db_url: str) -> None:
    a = make_tenant(db_session, "a")
    submit(db_session, a, 3)
    capped = Settings(tenant_max_running_jobs=2)
    claims = [claim(db_url, capped, f"w{i}") for i in range(3)]
    assert [c is not None for c in claims] == [True, True, False]


def test_canceled_and_exhausted_jobs_are_never_claimed(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    a = make_tenant(db_session, "a")
    canceled, exhausted, good = submit(db_session, a, 3)
    jobs.request_cancel(session=db_session, job=db_session.get(Job, canceled))
    db_session.get(Job, exhausted).attempt = 3  # type: ignore[union-attr]
    db_session.commit()

    claimed = claim(db_url, settings, "w1")
    assert claimed is not None and claimed.job_id == good
    assert claim(db_url, settings, "w2") is None


def test_a_requeued_job_keeps_its_place(db_session: Session, db_url: str, settings: Settings) -> None:
    """A job handed back by a stopping worker is its tenant's oldest again and resumes first."""
    a = make_tenant(db_session, "a")
    first, _ = submit(db_session, a, 2)
    claimed = claim(db_url, settings, "w1")
    assert claimed is not None and claimed.job_id == first
    with session_scope(db_url) as session:
        jobs.hand_back(session=session, job_id=first, attempt=claimed.attempt, reason="worker_shutdown")
    again = claim(db_url, settings, "w2")
    assert again is not None and (again.job_id, again.attempt) == (first, 2)


def _claim_concurrently(db_url: str, settings: Settings, workers: int) -> list[scheduling.Claimed | None]:
    barrier = threading.Barrier(workers)
    results: list[scheduling.Claimed | None] = [None] * workers

    def worker(index: int) -> None:
        session = new_session(db_url)
        try:
            barrier.wait()
            results[index] = scheduling.claim_next(session=session, settings=settings, worker_id=f"w{index}")
        finally:
            session.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_claims_respect_the_cap_and_claim_each_job_once(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    a, b = make_tenant(db_session, "a"), make_tenant(db_session, "b")
    set_overrides(session=db_session, tenant_id=a, values={"max_running_jobs": 2})
    submit(db_session, a, 10)
    submit(db_session, b, 3)

    for _ in range(5):  # the race is the point: several rounds give it chances to show
        results = _claim_concurrently(db_url, settings, workers=8)
        claimed = [r for r in results if r is not None]
        assert len({c.job_id for c in claimed}) == len(claimed)  # no job claimed twice
        running = dict(
            db_session.execute(
                select(Job.tenant_id, func.count())
                .where(Job.status == JobStatus.running)
                .group_by(Job.tenant_id)
            ).all()
        )
        assert running.get(a, 0) <= 2
        assert running.get(b, 0) <= 3
        for c in claimed:
            succeed(db_url, c)
        db_session.expire_all()

    left = db_session.scalar(select(func.count()).where(Job.status == JobStatus.queued))
    assert left == 0  # 13 jobs, at most 5 claims a round (2 of A + 3 of B), 5 rounds


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_claims_split_between_tenants(
    db_session: Session, db_url: str, settings: Settings
) -> None:
    """Two workers free at the same moment: one takes A's oldest, the other B's, never two of A's."""
    a, b = make_tenant(db_session, "a"), make_tenant(db_session, "b")
    submit(db_session, a, 5)
    submit(db_session, b, 1)
    for _ in range(3):
        results = _claim_concurrently(db_url, settings, workers=2)
        tenants = sorted(r.tenant_id for r in results if r is not None)
        assert tenants == sorted([a, b])
        for r in results:
            assert r is not None
            with session_scope(db_url) as session:
                jobs.hand_back(session=session, job_id=r.job_id, attempt=r.attempt, reason="test")


def test_a_freed_slot_rings_again_for_a_capped_tenant(
    db_session: Session, db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that found the tenant at its cap was spent; when its running job ends, the worker
    rings once more for the tenant's waiting job (and not when the tenant was below its cap)."""
    import worker.app
    from core.jobs.runner import _ring_for_tenant

    rung: list[str] = []
    monkeypatch.setattr(worker.app, "send_train", rung.append)
    settings = settings.model_copy(update={"database_url": db_url})
    a = make_tenant(db_session, "a")
    set_overrides(session=db_session, tenant_id=a, values={"max_running_jobs": 1})
    _, second = submit(db_session, a, 2)
    claimed = claim(db_url, settings, "w1")
    assert claimed is not None and claim(db_url, settings, "w2") is None  # this message is spent
    succeed(db_url, claimed)

    _ring_for_tenant(settings, a)
    assert rung == [second]

    set_overrides(session=db_session, tenant_id=a, values={"max_running_jobs": 3})
    _ring_for_tenant(settings, a)  # below its cap: no message was held back for it
    assert rung == [second]
