"""Generations with the jobs' guarantees (core/generation/states.py): a claim per attempt, a lease the
worker's heartbeat renews, fenced finishes, cancel, and a reaper that re-queues a generation whose
worker died, a bounded number of times, then fails it `worker_lost`.

The state machine on SQLite and PostgreSQL; the beat's reaper and the cancel route in-process; whole
attempts in-process on tiny-sd (lease lost while denoising or while storing, cancel between steps, a
dead attempt's leftovers); and the fault itself on the full stack: the generate worker SIGKILLed
mid-generation, the generation finished exactly once, its images stored once.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import MIGRATIONS_DIR, get_engine, session_scope, upgrade
from core.generation import inference
from core.generation import states as generation_states
from core.generation.images import attempt_prefix, generation_prefix
from core.generation.params import GenerationSpec
from core.ids import new_id
from core.models import Generation, JobStatus
from core.storage.base import Storage
from core.storage.factory import make_storage
from core.timeutil import utcnow
from tests.db_fixtures import ApiTenant, SentTasks, make_tenant
from tests.fault_injection import PrivateRedis
from tests.s3_server import S3Server
from tests.service_stack import Stack
from tests.service_stack import test_model_cache as model_cache_folder
from tests.test_api_contract import assert_problem

TERMINAL = {"succeeded", "failed", "canceled"}


# --- helpers -------------------------------------------------------------------------------------------


def _generation(session: Session, tenant_id: str, *, max_attempts: int = 3, **spec: Any) -> str:
    body = GenerationSpec(base_model="tiny-sd", prompt="a red square", seed=3, **spec)
    row = Generation(
        id=new_id("gen"),
        tenant_id=tenant_id,
        spec=body.model_dump(mode="json"),
        status=JobStatus.queued,
        max_attempts=max_attempts,
    )
    session.add(row)
    session.commit()
    return row.id


def _row(session: Session, generation_id: str) -> Generation:
    row = session.get(Generation, generation_id, populate_existing=True)
    assert row is not None
    return row


def _claim(session: Session, generation_id: str, worker_id: str = "host:1", lease_s: float = 60) -> int:
    attempt = generation_states.claim(
        session=session, generation_id=generation_id, worker_id=worker_id, lease_s=lease_s
    )
    assert attempt is not None
    return attempt


def _expire(session: Session, generation_id: str) -> None:
    """As if the worker's last heartbeat were a lease ago: it died, or stalls."""
    session.execute(
        update(Generation)
        .where(Generation.id == generation_id)
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


# --- the state machine, on SQLite and PostgreSQL -------------------------------------------------------


def test_a_claim_starts_one_attempt_and_a_duplicate_message_does_nothing(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session))
    before = utcnow()
    assert _claim(db_session, generation_id, worker_id="host:41") == 1
    row = _row(db_session, generation_id)
    assert (row.status, row.attempt, row.worker_id) == (JobStatus.running, 1, "host:41")
    assert row.lease_expires_at is not None and row.lease_expires_at > before + timedelta(seconds=59)
    assert row.started_at is not None and row.started_at >= before
    # A message delivered again (the worker's death re-queues it in Redis) finds it running.
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:2", lease_s=60)
        is None
    )
    assert _row(db_session, generation_id).attempt == 1


def test_the_heartbeat_renews_the_lease_and_reads_the_cancel_flag(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session))
    attempt = _claim(db_session, generation_id)
    _expire(db_session, generation_id)
    beat = {"session": db_session, "generation_id": generation_id, "attempt": attempt, "lease_s": 30}
    assert generation_states.heartbeat(**beat) is False
    lease = _row(db_session, generation_id).lease_expires_at
    assert lease is not None and lease > utcnow() + timedelta(seconds=25)
    # The reaper leaves a live lease alone.
    assert generation_states.reap_stale(session=db_session) == []
    row = generation_states.request_cancel(session=db_session, generation=_row(db_session, generation_id))
    assert (row.status, row.cancel_requested) == (JobStatus.running, True)
    assert generation_states.heartbeat(**beat) is True


def test_a_reaped_attempt_is_fenced_out_and_the_next_one_finishes(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session))
    first = _claim(db_session, generation_id, worker_id="host:1")
    _expire(db_session, generation_id)

    assert generation_states.reap_stale(session=db_session) == [generation_id]
    row = _row(db_session, generation_id)
    assert (row.status, row.attempt, row.worker_id, row.lease_expires_at) == ("queued", 1, None, None)
    assert row.dispatched_at is None  # the reconciler re-sends it should the reaper's send be lost
    with pytest.raises(generation_states.LeaseLost):
        generation_states.heartbeat(
            session=db_session, generation_id=generation_id, attempt=first, lease_s=60
        )

    second = _claim(db_session, generation_id, worker_id="host:2")
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
    assert (_row(db_session, generation_id).status, _row(db_session, generation_id).attempt) == ("running", 2)
    generation_states.finish(
        session=db_session,
        generation_id=generation_id,
        attempt=second,
        status=JobStatus.succeeded,
        image_keys=["attempt-2/0.png"],
    )
    row = _row(db_session, generation_id)
    assert (row.status, row.image_keys, row.worker_id) == ("succeeded", ["attempt-2/0.png"], "host:2")
    assert row.finished_at is not None and row.lease_expires_at is None
    # Finished is final: the first attempt cannot finish it again either.
    with pytest.raises(generation_states.LeaseLost):
        generation_states.finish(
            session=db_session, generation_id=generation_id, attempt=second, status=JobStatus.failed
        )


def test_attempts_are_bounded_then_the_generation_fails_worker_lost(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session), max_attempts=2)
    _claim(db_session, generation_id)
    _expire(db_session, generation_id)
    assert generation_states.reap_stale(session=db_session) == [generation_id]
    assert _claim(db_session, generation_id) == 2
    _expire(db_session, generation_id)

    assert generation_states.reap_stale(session=db_session) == []
    row = _row(db_session, generation_id)
    assert (row.status, row.error_code, row.attempt) == ("failed", generation_states.WORKER_LOST, 2)
    assert row.error_message is not None and "2 attempts" in row.error_message
    assert row.finished_at is not None and row.lease_expires_at is None
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:3", lease_s=60)
        is None
    )


def test_cancel_of_a_queued_generation_is_final(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session))
    row = generation_states.request_cancel(session=db_session, generation=_row(db_session, generation_id))
    assert (row.status, row.cancel_requested) == ("canceled", True)
    assert row.finished_at is not None
    # Its message still arrives: the claim refuses it.
    assert (
        generation_states.claim(session=db_session, generation_id=generation_id, worker_id="h:1", lease_s=60)
        is None
    )
    assert _row(db_session, generation_id).status == "canceled"


def test_a_canceled_generation_whose_worker_died_ends_canceled_not_retried(db_session: Session) -> None:
    generation_id = _generation(db_session, make_tenant(db_session))
    _claim(db_session, generation_id)
    generation_states.request_cancel(session=db_session, generation=_row(db_session, generation_id))
    _expire(db_session, generation_id)
    assert generation_states.reap_stale(session=db_session) == []
    row = _row(db_session, generation_id)
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
        row = _row(session, stuck)
        assert (row.max_attempts, row.cancel_requested, row.lease_expires_at) == (3, False, an_hour_ago)
        assert generation_states.reap_stale(session=session) == [stuck]
        assert _row(session, stuck).status == "queued"


# --- the beat's reaper ---------------------------------------------------------------------------------


def test_the_beat_requeues_a_dead_workers_generation_and_sends_it_again(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks

    upgrade(api_settings.database_url)
    with session_scope(api_settings.database_url) as session:
        generation_id = _generation(session, make_tenant(session))
        _claim(session, generation_id)
        _expire(session, generation_id)
    sent: list[str] = []
    monkeypatch.setattr(worker.tasks, "send_generate", sent.append)
    monkeypatch.setattr(worker.tasks, "send_train", lambda job_id: None)

    result = worker.tasks.reap_stale_jobs()

    assert result["requeued_generations"] == [generation_id]
    assert sent == [generation_id] == result["resent_generations"]
    with session_scope(api_settings.database_url) as session:
        row = _row(session, generation_id)
        assert row.status == "queued" and row.dispatched_at is not None
    # Sent and recently: the next beat neither re-queues nor re-sends it.
    assert worker.tasks.reap_stale_jobs()["resent_generations"] == []
    assert sent == [generation_id]


# --- POST /v1/generations/{id}/cancel ------------------------------------------------------------------


def _create(client: TestClient, tenant: ApiTenant) -> dict[str, Any]:
    response = client.post(
        "/v1/generations", headers=tenant.headers, json={"base_model": "tiny-sd", "prompt": "a red square"}
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_cancel_a_queued_generation_through_the_api(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, globex: ApiTenant, sent_tasks: SentTasks
) -> None:
    created = _create(api_client, acme)
    assert (created["status"], created["attempt"], created["cancel_requested"]) == ("queued", 0, False)
    assert created["max_attempts"] == api_settings.generation_max_attempts
    generation_id = created["id"]
    assert sent_tasks.generate == [generation_id]

    foreign = api_client.post(f"/v1/generations/{generation_id}/cancel", headers=globex.headers)
    missing = api_client.post("/v1/generations/gen_missing/cancel", headers=globex.headers)
    assert_problem(foreign, 404, "generation_not_found")
    assert foreign.text.replace(generation_id, "<id>") == missing.text.replace("gen_missing", "<id>")
    assert (
        api_client.get(f"/v1/generations/{generation_id}", headers=acme.headers).json()["status"] == "queued"
    )

    canceled = api_client.post(f"/v1/generations/{generation_id}/cancel", headers=acme.headers)
    assert canceled.status_code == 200, canceled.text
    body = canceled.json()
    assert (body["status"], body["cancel_requested"]) == ("canceled", True)
    assert body["finished_at"] is not None
    again = api_client.post(f"/v1/generations/{generation_id}/cancel", headers=acme.headers)
    assert "already canceled" in assert_problem(again, 409, "generation_finished")["detail"]


def test_cancel_a_running_generation_flags_it_for_its_worker(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant
) -> None:
    generation_id = _create(api_client, acme)["id"]
    with session_scope(api_settings.database_url) as session:
        attempt = _claim(session, generation_id)

    response = api_client.post(f"/v1/generations/{generation_id}/cancel", headers=acme.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["cancel_requested"], body["attempt"]) == ("running", True, 1)
    assert body["started_at"] is not None and body["finished_at"] is None
    with session_scope(api_settings.database_url) as session:
        assert generation_states.heartbeat(
            session=session, generation_id=generation_id, attempt=attempt, lease_s=60
        )


# --- whole attempts in-process, on tiny-sd ------------------------------------------------------------


@pytest.fixture
def gen_settings(api_settings: Settings) -> Settings:
    """SQLite and local storage, tiny-sd on the CPU, a heartbeat five times a second."""
    upgrade(api_settings.database_url)
    api_settings.model_cache = Path(model_cache_folder())
    api_settings.device = "cpu"
    api_settings.heartbeat_s, api_settings.lease_s = 0.2, 2.0
    return api_settings


def _queued(settings: Settings, **spec: Any) -> tuple[str, str]:
    """(tenant id, generation id) of a small queued generation."""
    with session_scope(settings.database_url) as session:
        tenant_id = make_tenant(session)
        size = {"width": 32, "height": 32, "steps": 2, "num_images": 2} | spec
        return tenant_id, _generation(session, tenant_id, **size)


def _take_over(settings: Settings, generation_id: str) -> None:
    """What the reaper and another worker do while the first attempt stalls: it lost the lease."""
    with session_scope(settings.database_url) as session:
        for _ in range(20):
            _expire(session, generation_id)
            # A heartbeat landing between the two renews the lease, and the reaper rightly spares it.
            if generation_states.reap_stale(session=session) == [generation_id]:
                break
        else:
            raise AssertionError("the attempt's heartbeat renewed its lease every time")
        assert _claim(session, generation_id, worker_id="other:2") == 2


def _stored(storage: Storage, tenant_id: str, generation_id: str) -> list[str]:
    return storage.list(generation_prefix(tenant_id, generation_id))


def test_an_attempt_removes_what_a_dead_attempt_left_and_stores_under_its_own_prefix(
    gen_settings: Settings,
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = _queued(gen_settings)
    with session_scope(gen_settings.database_url) as session:
        _claim(session, generation_id, worker_id="dead:1")
    # Attempt 1 was killed while storing its images: one of two made it.
    storage.put_bytes(
        f"{attempt_prefix(tenant_id, generation_id, 1)}/0.png", b"half", content_type="image/png"
    )
    with session_scope(gen_settings.database_url) as session:
        _expire(session, generation_id)
        assert generation_states.reap_stale(session=session) == [generation_id]

    status = inference.run_generation(
        generation_id=generation_id, settings=gen_settings, storage=storage, worker_id="live:2"
    )

    assert status == "succeeded"
    with session_scope(gen_settings.database_url) as session:
        row = _row(session, generation_id)
        assert (row.attempt, row.worker_id, row.error_code) == (2, "live:2", None)
        keys = row.image_keys
    second = attempt_prefix(tenant_id, generation_id, 2)
    assert keys == [f"{second}/0.png", f"{second}/1.png"]
    assert _stored(storage, tenant_id, generation_id) == keys
    assert storage.get_bytes(keys[0]).startswith(b"\x89PNG")


def test_an_attempt_that_loses_its_lease_while_denoising_stores_nothing(
    gen_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = _queued(gen_settings, steps=40)
    real = inference.generate_images
    steps: list[int] = []

    def stalled_then_reaped(*, on_step: Callable[[], None], **kwargs: Any) -> list[Any]:
        _take_over(gen_settings, generation_id)

        def step() -> None:
            steps.append(1)
            time.sleep(0.05)  # bounds the steps run before the next heartbeat learns the news
            on_step()

        return real(on_step=step, **kwargs)

    monkeypatch.setattr(inference, "generate_images", stalled_then_reaped)
    assert (
        inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage) is None
    )

    assert 0 < len(steps) < 40, "the attempt ran to the end of its steps, past the lost lease"
    with session_scope(gen_settings.database_url) as session:
        row = _row(session, generation_id)
        assert (row.status, row.attempt, row.worker_id, row.image_keys) == ("running", 2, "other:2", None)
    assert _stored(storage, tenant_id, generation_id) == []


class _TakeoverWhileStoring:
    """The storage, with the lease taken away right after the attempt's first image is stored."""

    def __init__(self, storage: Storage, take_over: Callable[[], None]) -> None:
        self._storage, self._take_over, self.puts = storage, take_over, 0

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        self._storage.put_bytes(key, data, content_type=content_type)
        self.puts += 1
        if self.puts == 1:
            self._take_over()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def test_an_attempt_fenced_out_while_storing_discards_what_it_stored(gen_settings: Settings) -> None:
    tenant_id, generation_id = _queued(gen_settings)
    storage = _TakeoverWhileStoring(
        make_storage(gen_settings), lambda: _take_over(gen_settings, generation_id)
    )

    status = inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage)  # type: ignore[arg-type]

    assert status is None
    assert storage.puts == 2  # both images were stored, then the fenced finish refused them
    with session_scope(gen_settings.database_url) as session:
        row = _row(session, generation_id)
        assert (row.status, row.attempt, row.image_keys) == ("running", 2, None)
    assert _stored(storage, tenant_id, generation_id) == []  # type: ignore[arg-type]


def test_cancel_stops_a_running_generation_between_steps(
    gen_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = _queued(gen_settings, steps=100)
    real = inference.generate_images
    steps: list[int] = []

    def canceled_meanwhile(*, on_step: Callable[[], None], **kwargs: Any) -> list[Any]:
        with session_scope(gen_settings.database_url) as session:
            generation_states.request_cancel(session=session, generation=_row(session, generation_id))

        def step() -> None:
            steps.append(1)
            time.sleep(0.05)
            on_step()

        return real(on_step=step, **kwargs)

    monkeypatch.setattr(inference, "generate_images", canceled_meanwhile)
    assert inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage) == (
        "canceled"
    )

    assert 0 < len(steps) < 100
    with session_scope(gen_settings.database_url) as session:
        row = _row(session, generation_id)
        assert (row.status, row.cancel_requested, row.image_keys, row.error_code) == (
            "canceled",
            True,
            None,
            None,
        )
        assert row.finished_at is not None and row.lease_expires_at is None
    assert _stored(storage, tenant_id, generation_id) == []


# --- the fault: the generate worker SIGKILLed mid-generation, on the full stack -----------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own for full_stack (tests/service_stack.py): other sessions' tests
    flush the shared database while they run, which would lose this stack's messages."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    try:
        yield server.url
    finally:
        server.stop()


def _wait_for(what: str, check: Callable[[], Any], stack: Stack, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    logs = "\n".join(f"--- {name} ---\n{stack.log(name)[-2500:]}" for name in stack.processes)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _full_log(stack: Stack, name: str) -> str:
    """All of a process's log (Stack.log keeps only its tail)."""
    return (stack.home / f"{name}.log").read_text(errors="replace")


def _objects(s3_server: S3Server, stack: Stack, prefix: str) -> list[str]:
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["ATELIER_S3_BUCKET"], Prefix=prefix + "/"
    ):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


@pytest.mark.services
@pytest.mark.slow
def test_generate_worker_killed_mid_generation_finishes_once_with_its_images_stored_once(
    full_stack: Stack, s3_server: S3Server
) -> None:
    from worker.lifecycle import child_pids

    stack = full_stack
    stack.env["ATELIER_GENERATION_MAX_ATTEMPTS"] = "2"
    stack.start_api()
    stack.start_beat()
    stack.start_worker("worker-maintenance", queues="maintenance")
    first = stack.start_worker("worker-generate-1", queues="generate")
    for name in ("worker-maintenance", "worker-generate-1"):
        stack.wait_consuming(name)
    client = stack.client("acme")
    # Long enough on tiny-sd to still be denoising seconds after it started (tens of seconds here).
    body = {"base_model": "tiny-sd", "prompt": "a red square", "steps": 60, "num_images": 2, "seed": 5}
    generation_id = client.generate({**body, "width": 32, "height": 32})["id"]

    running = _wait_for(
        "the generation to start",
        lambda: (gen := client.generation(generation_id))["status"] == "running" and gen,
        stack,
        timeout_s=120,
    )
    assert running["attempt"] == 1
    with session_scope(stack.database_url) as session:
        row = _row(session, generation_id)
        tenant_id, holder = row.tenant_id, row.worker_id
    # The row names the pool process of worker 1 that runs it.
    assert holder in {f"{socket.gethostname()}:{pid}" for pid in child_pids(first.pid)}, holder
    time.sleep(2)  # into the denoising loop: loading tiny-sd takes a second or two
    assert client.generation(generation_id)["status"] == "running", "finished before the kill: make it longer"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()

    stack.start_worker("worker-generate-2", queues="generate")
    final = _wait_for(
        "the generation to finish",
        lambda: (gen := client.generation(generation_id))["status"] in TERMINAL and gen,
        stack,
        timeout_s=240,
    )
    recovered_s = time.monotonic() - killed_at

    assert final["status"] == "succeeded", final["error"]
    assert (final["attempt"], final["error"]) == (2, None)
    assert len(final["images"]) == 2
    prefix = generation_prefix(tenant_id, generation_id)
    with session_scope(stack.database_url) as session:
        keys = _row(session, generation_id).image_keys
    assert keys == [f"{prefix}/attempt-2/{index}.png" for index in range(2)]
    assert _objects(s3_server, stack, prefix) == keys  # stored once: nothing of the killed attempt
    # Finished exactly once: one attempt ended, the second, and the reaper is what re-queued it.
    logs = "\n".join(_full_log(stack, name) for name in stack.processes)
    assert logs.count(f"generation {generation_id} attempt 2 ended: succeeded") == 1
    assert f"generation {generation_id} attempt 1 ended" not in logs
    assert f"requeued generations ['{generation_id}']" in _full_log(stack, "worker-maintenance")
    print(f"killed mid-generation; succeeded on attempt 2 {recovered_s:.1f} s after the kill")
