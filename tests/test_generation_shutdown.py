"""A generate worker that shuts down hands its running generation back (core/generation/handback.py),
as a training worker hands back its job: queued again at once and re-sent, its attempt not counted
against `max_attempts`, nothing of the attempt kept.

The state machine's hand-back on SQLite and PostgreSQL; the worker's own hand-back for the pool
processes it killed; whole attempts in-process on tiny-sd (stopped at the next denoising step, or
not stopped once the images are made); and the generate worker SIGTERMed mid-generation on the full
stack, the generation finished once by the next worker.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from core import dispatch
from core.config import Settings
from core.db import session_scope
from core.generation import handback, inference
from core.generation import heartbeat as generation_heartbeat
from core.generation import queue as generation_queue
from core.generation import states as generation_states
from core.generation.images import attempt_prefix, generation_prefix
from core.models import JobStatus
from core.storage.factory import make_storage
from tests import generation_fixtures
from tests.db_fixtures import make_tenant
from tests.generation_fixtures import (
    TERMINAL,
    add_generation,
    claim_now,
    fresh_row,
    full_log,
    queued_generation,
    s3_objects,
    stored_keys,
    wait_for,
)
from tests.s3_server import S3Server
from tests.service_stack import Stack
from tests.test_shutdown import _tree, _wait_gone

# Fixtures are found by name in the test's module; full_stack gets a Redis of this test's own.
gen_settings = generation_fixtures.gen_settings
redis_url = generation_fixtures.redis_url


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The generations handed to the broker, instead of sending them."""
    sent: list[str] = []
    monkeypatch.setattr(dispatch, "send_generate", sent.append)
    return sent


@pytest.fixture
def shutdown(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Requests this test's shutdown: a fresh flag, so no other test sees it set."""
    monkeypatch.setattr(generation_heartbeat, "_shutdown", threading.Event())
    return generation_heartbeat.request_shutdown


# --- the state machine, on SQLite and PostgreSQL -------------------------------------------------------


def test_hand_back_queues_the_generation_without_spending_an_attempt(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session), max_attempts=1)
    first = claim_now(db_session, generation_id, worker_id="host:41")
    assert generation_states.running_on(session=db_session, worker_ids=["host:41", "host:42"]) == [
        (generation_id, first)
    ]
    assert generation_states.running_on(session=db_session, worker_ids=["other:41"]) == []

    status = generation_states.hand_back(session=db_session, generation_id=generation_id, attempt=first)

    assert status == JobStatus.queued
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.attempt, row.max_attempts) == ("queued", 1, 2)
    assert (row.worker_id, row.lease_expires_at, row.dispatched_at, row.finished_at) == (None,) * 4
    # Its only attempt was handed back, so it runs once more, fenced by a new attempt.
    assert claim_now(db_session, generation_id, worker_id="host:43") == 2
    with pytest.raises(generation_states.LeaseLost):
        generation_states.hand_back(session=db_session, generation_id=generation_id, attempt=first)
    with pytest.raises(generation_states.LeaseLost):
        generation_states.finish(
            session=db_session, generation_id=generation_id, attempt=first, status=JobStatus.succeeded
        )
    assert (fresh_row(db_session, generation_id).status, fresh_row(db_session, generation_id).attempt) == (
        "running",
        2,
    )


def test_hand_back_honours_a_pending_cancel(db_session: Session) -> None:
    generation_id = add_generation(db_session, make_tenant(db_session))
    attempt = claim_now(db_session, generation_id)
    generation_states.request_cancel(session=db_session, generation=fresh_row(db_session, generation_id))

    status = generation_states.hand_back(session=db_session, generation_id=generation_id, attempt=attempt)

    assert status == JobStatus.canceled
    row = fresh_row(db_session, generation_id)
    assert (row.status, row.max_attempts, row.lease_expires_at) == ("canceled", 3, None)
    assert row.finished_at is not None


def test_a_generation_handed_back_while_the_broker_is_down_is_left_for_the_reconciler(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(generation_id: str) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(dispatch, "send_generate", broker_down)
    settings = Settings(home=tmp_path, database_url=db_url)
    with session_scope(db_url) as session:
        generation_id = add_generation(session, make_tenant(session))
        attempt = claim_now(session, generation_id)

    outcome = handback.hand_back(settings=settings, generation_id=generation_id, attempt=attempt)

    assert outcome == handback.HANDED_BACK
    with session_scope(db_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.dispatched_at) == ("queued", None)
        # Never sent: the reaper's reconciler sends it at its next beat.
        assert generation_queue.undispatched(session=session, older_than_s=0) == [generation_id]


# --- the worker's main process, for the pool processes it killed ---------------------------------------


def test_the_worker_hands_back_the_generation_of_a_pool_process_it_killed(
    api_settings: Settings, sent: list[str]
) -> None:
    from core.db import upgrade
    from worker.lifecycle import WorkerShutdown
    from worker.tasks import worker_id

    upgrade(api_settings.database_url)
    with session_scope(api_settings.database_url) as session:
        tenant_id = make_tenant(session)
        held = add_generation(session, tenant_id)
        elsewhere = add_generation(session, tenant_id)
        claim_now(session, held, worker_id=worker_id(4242))
        claim_now(session, elsewhere, worker_id="another-host:4242")

    WorkerShutdown(api_settings)._hand_back([4242])

    assert sent == [held]
    with session_scope(api_settings.database_url) as session:
        row = fresh_row(session, held)
        assert (row.status, row.max_attempts) == ("queued", 4)
        assert row.dispatched_at is not None
        assert fresh_row(session, elsewhere).status == "running"


# --- whole attempts in-process, on tiny-sd ------------------------------------------------------------


def test_a_shutdown_stops_the_generation_at_the_next_step_and_hands_it_back(
    gen_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[str],
    shutdown: Callable[[], None],
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = queued_generation(gen_settings, steps=40, max_attempts=1)
    real = inference.generate_images
    steps: list[int] = []

    def shut_down_at_step_3(*, on_step: Callable[[], None], **kwargs: Any) -> list[Any]:
        def step() -> None:
            steps.append(1)
            if len(steps) == 3:
                shutdown()  # as the pool process's SIGTERM handler does
            on_step()

        return real(on_step=step, **kwargs)

    monkeypatch.setattr(inference, "generate_images", shut_down_at_step_3)
    status = inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage)

    assert (status, len(steps)) == ("handed_back", 3)
    assert sent == [generation_id]
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.attempt, row.max_attempts, row.image_keys) == ("queued", 1, 2, None)
        assert row.dispatched_at is not None
    assert stored_keys(storage, tenant_id, generation_id) == []

    # The next worker: its one real attempt left.
    monkeypatch.setattr(generation_heartbeat, "_shutdown", threading.Event())
    assert (
        inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage)
        == "succeeded"
    )
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.attempt, row.error_code) == (2, None)
    second = attempt_prefix(tenant_id, generation_id, 2)
    assert stored_keys(storage, tenant_id, generation_id) == [f"{second}/0.png", f"{second}/1.png"]


def test_a_shutdown_after_the_images_are_made_stores_them(
    gen_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    sent: list[str],
    shutdown: Callable[[], None],
) -> None:
    """Storing made images takes less than another attempt would: the attempt finishes."""
    storage = make_storage(gen_settings)
    tenant_id, generation_id = queued_generation(gen_settings)
    real = inference.generate_images

    def shut_down_after_denoising(**kwargs: Any) -> list[Any]:
        images = real(**kwargs)
        shutdown()
        return images

    monkeypatch.setattr(inference, "generate_images", shut_down_after_denoising)
    status = inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage)

    assert (status, sent) == ("succeeded", [])
    assert len(stored_keys(storage, tenant_id, generation_id)) == 2


# --- the generate worker SIGTERMed mid-generation, on the full stack ----------------------------------


@pytest.mark.services
@pytest.mark.slow
def test_generate_worker_stopped_mid_generation_hands_it_back_to_the_next_worker(
    full_stack: Stack, s3_server: S3Server
) -> None:
    """No beat runs, so no reaper: only the hand-back can queue it again and send it, and with one
    attempt allowed, a reaped generation would have failed `worker_lost` instead. The grace is long,
    so the worker is gone within the bound only if the attempt itself stopped at a step (the worker
    killing it at the grace's end, and handing it back, is the fallback)."""
    stack = full_stack
    stack.env["ATELIER_GENERATION_MAX_ATTEMPTS"] = "1"
    stack.env["ATELIER_SHUTDOWN_GRACE_S"] = "120"
    stack.start_api()
    first = stack.start_worker("worker-generate-1", queues="generate")
    stack.wait_consuming("worker-generate-1")
    client = stack.client("acme")
    # Long enough on tiny-sd to still be denoising seconds after it started (about ten here).
    body = {"base_model": "tiny-sd", "prompt": "a red square", "steps": 60, "num_images": 2, "seed": 5}
    generation_id = client.generate({**body, "width": 32, "height": 32})["id"]
    wait_for(
        "the generation to start",
        lambda: client.generation(generation_id)["status"] == "running",
        stack,
        timeout_s=120,
    )
    time.sleep(2)  # into the denoising loop: loading tiny-sd takes a second or two
    assert client.generation(generation_id)["status"] == "running", "finished before the signal"
    tree = _tree(first.pid)

    signalled = time.monotonic()
    first.send_signal(signal.SIGTERM)
    took = _wait_gone(tree, signalled)
    assert first.wait() == 0
    with session_scope(stack.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.attempt, row.max_attempts) == ("queued", 1, 2), row.error_code
        assert row.dispatched_at is not None  # sent again by the stopping worker
        tenant_id = row.tenant_id
    stopped = full_log(stack, "worker-generate-1")
    assert f"generation {generation_id} attempt 1 stopped: the worker is shutting down" in stopped
    assert f"generation {generation_id} attempt 1 requeued: worker_shutdown" in stopped

    stack.start_worker("worker-generate-2", queues="generate")
    final = wait_for(
        "the generation to finish",
        lambda: (gen := client.generation(generation_id))["status"] in TERMINAL and gen,
        stack,
        timeout_s=240,
    )

    assert final["status"] == "succeeded", final["error"]
    assert (final["attempt"], len(final["images"])) == (2, 2)
    prefix = generation_prefix(tenant_id, generation_id)
    assert s3_objects(s3_server, stack, prefix) == [f"{prefix}/attempt-2/{index}.png" for index in range(2)]
    logs = "\n".join(full_log(stack, name) for name in stack.processes)
    assert logs.count(f"generation {generation_id} attempt 2 ended: succeeded") == 1
    assert f"generation {generation_id} attempt 1 ended" not in logs
    print(f"generate worker gone {took:.1f} s after SIGTERM; succeeded on attempt 2")
