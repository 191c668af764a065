"""Every Atelier process ends cleanly on SIGTERM or SIGINT (design.md §10): within a bound, with no
process of its tree left, and with its running training job handed back (queued again at once) to
resume from its newest checkpoint. Real processes on the embedded stack (tests/service_stack.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from cli.client import AtelierClient
from cli.demo import make_dataset_zip
from core.db import session_scope
from core.jobs import states as jobs
from core.models import Job, JobEvent, JobStatus
from tests.service_stack import Stack
from tests.test_job_states import new_job
from worker.lifecycle import EX_SOFTWARE

# Each process's bound after a signal: the worker's grace is not reached (a running attempt stops at
# its next progress report, every second here); most of the time is Celery's own shutdown.
BOUND_S = 30.0


# --- handing a job back (core.jobs.states), in-process on SQLite and PostgreSQL --------------------------


def test_hand_back_queues_the_job_without_spending_an_attempt(db_url: str) -> None:
    machine = new_job(db_url, max_attempts=1)
    attempt = machine.run(jobs.claim, worker_id="host:41", lease_s=60)
    with session_scope(db_url) as session:
        assert jobs.running_on(session=session, worker_ids=["host:41", "host:42"]) == [
            (machine.job_id, attempt)
        ]
        assert jobs.running_on(session=session, worker_ids=["other:41"]) == []
    assert machine.run(jobs.hand_back, attempt=attempt, reason="worker_shutdown") == JobStatus.queued
    row = machine.row()
    assert (row.status, row.max_attempts, row.worker_id, row.lease_expires_at) == ("queued", 2, None, None)
    assert machine.events()[-1] == ("requeued", 1)
    # Its last attempt was handed back, so it can still run: once more, fenced by a new attempt.
    assert machine.run(jobs.claim, worker_id="host:43", lease_s=60) == 2
    with pytest.raises(jobs.LeaseLost):
        machine.run(jobs.hand_back, attempt=1, reason="worker_shutdown")


def test_hand_back_honours_a_pending_cancel(db_url: str) -> None:
    machine = new_job(db_url)
    attempt = machine.run(jobs.claim, worker_id="host:41", lease_s=60)
    machine.set(cancel_requested=True)
    assert machine.run(jobs.hand_back, attempt=attempt, reason="worker_shutdown") == JobStatus.canceled
    assert machine.row().status == "canceled"


# --- real processes ----------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited; its reaper may be slow
    except psutil.NoSuchProcess:
        return True


def _wait_gone(tree: list[psutil.Process], since: float, bound_s: float = BOUND_S) -> float:
    """Seconds from `since` until every process of `tree` has exited; fails past the bound."""
    while time.monotonic() - since < bound_s:
        if all(_gone(p) for p in tree):
            return time.monotonic() - since
        time.sleep(0.05)
    left = [(p.pid, p.cmdline()[-4:]) for p in tree if not _gone(p)]
    raise AssertionError(f"still running {bound_s:.0f} s after the signal: {left}")


def _job_body(dataset_id: str) -> dict[str, Any]:
    # Long enough to be mid-training at the signal (tiny-sd trains tens of steps a second).
    training = {"max_steps": 400, "checkpoint_every": 10, "learning_rate": 1e-3, "batch_size": 1, "seed": 1}
    return {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4, "alpha": 4},
        "training": training,
    }


def _start_job(client: AtelierClient, tmp_path: Path) -> str:
    dataset = client.upload_dataset([make_dataset_zip(tmp_path / "data.zip", count=4)])["id"]
    return client.create_job(_job_body(dataset))["id"]


def _job(stack: Stack, job_id: str) -> Job:
    """The row itself: the API may be down."""
    with session_scope(stack.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _events(stack: Stack, job_id: str) -> list[JobEvent]:
    with session_scope(stack.database_url) as session:
        events = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )
        session.expunge_all()
        return events


def _wait_checkpoint(stack: Stack, job_id: str, logs: str) -> int:
    deadline = time.monotonic() + 240
    while not (step := _job(stack, job_id).checkpoint_step):
        assert time.monotonic() < deadline, f"no checkpoint\n{stack.log(logs)}"
        time.sleep(0.2)
    return step


def _pool_process(worker: subprocess.Popen) -> psutil.Process:
    """The worker's pool process that runs the job (the one that loaded torch)."""
    children = psutil.Process(worker.pid).children()
    return max(children, key=lambda p: p.memory_info().rss)


def _assert_handed_back(stack: Stack, job_id: str, attempt: int) -> None:
    """Queued again at once (not reaped after its lease), without spending an attempt."""
    job = _job(stack, job_id)
    assert job.status == "queued", (job.status, job.error_code)
    assert job.max_attempts == 3 + attempt
    requeued = [e for e in _events(stack, job_id) if e.type == "requeued" and e.attempt == attempt]
    assert [e.data for e in requeued] == [{"reason": "worker_shutdown"}]


def _assert_resumed(client: AtelierClient, job_id: str, *, from_step: int, logs: str) -> None:
    final = client.wait(job_id, timeout_s=300)
    assert final["status"] == "succeeded", (final["error"], logs)
    manifest = client.artifact(final["artifact_id"])["manifest"]
    assert manifest["metrics"]["resumed_from_step"] >= from_step
    resumed = [
        e for e in client.get(f"/v1/jobs/{job_id}/events", limit=1000)["data"] if e["type"] == "resumed"
    ]
    assert [e["data"]["from_step"] for e in resumed] == [manifest["metrics"]["resumed_from_step"]]
    artifacts = [a for a in client.get("/v1/artifacts", limit=100)["data"] if a["job_id"] == job_id]
    assert [a["id"] for a in artifacts] == [final["artifact_id"]]


def _same_key(client: AtelierClient, stack: Stack) -> AtelierClient:
    """The client for a restarted API (a new port), with the same key."""
    key = client.http.headers["Authorization"].removeprefix("Bearer ")
    return AtelierClient(stack.base_url, key)


@pytest.mark.slow
def test_serve_stops_its_workers_and_hands_the_job_back(embedded_stack: Stack, tmp_path: Path) -> None:
    stack = embedded_stack
    stack.start_api(with_worker=True)
    client = stack.client()
    job_id = _start_job(client, tmp_path)
    step = _wait_checkpoint(stack, job_id, "api")
    serve = stack.processes["api"]
    tree = _tree(serve.pid)
    assert len(tree) >= 5  # serve, two workers, their pool processes (and the beat)

    signalled = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    took = _wait_gone(tree, signalled)
    print(f"serve and its {len(tree) - 1} processes gone {took:.1f} s after SIGTERM")
    assert serve.wait() == 0
    _assert_handed_back(stack, job_id, attempt=1)

    stack.start_api(with_worker=True)
    _assert_resumed(_same_key(client, stack), job_id, from_step=step, logs=stack.log("worker"))
    assert _job(stack, job_id).attempt == 2


@pytest.mark.slow
def test_worker_whose_pool_process_was_killed_stops_in_time(embedded_stack: Stack, tmp_path: Path) -> None:
    """billiard once hung for minutes at exit when the pool's process had died; the job is reaped
    (its process is gone, so its lease expires) and resumed by the next workers."""
    stack = embedded_stack
    stack.start_api()
    worker = stack.start_train_worker("worker-1")
    client = stack.client()
    job_id = _start_job(client, tmp_path)
    step = _wait_checkpoint(stack, job_id, "worker-1")
    _pool_process(worker).kill()
    time.sleep(1)  # the pool notices its lost process and starts another
    tree = _tree(worker.pid)

    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    took = _wait_gone(tree, signalled)
    print(f"worker gone {took:.1f} s after SIGTERM (its pool process had been killed)")

    stack.start_workers()  # a training worker, and the reaper's schedule
    _assert_resumed(client, job_id, from_step=step, logs=stack.log("worker"))


@pytest.mark.slow
@pytest.mark.parametrize("force", ["second_signal", "grace_over"])
def test_a_stuck_pool_process_is_killed_and_its_job_handed_back(
    embedded_stack: Stack, tmp_path: Path, force: str
) -> None:
    """The pool process is frozen here, so it cannot hand its job back. A second signal (Ctrl+C
    twice) does not wait for the grace; otherwise the grace running out ends it: the worker kills the
    pool process, hands its job back itself and exits."""
    stack = embedded_stack
    stack.env["ATELIER_SHUTDOWN_GRACE_S"] = "120" if force == "second_signal" else "3"
    stack.start_api()
    worker = stack.start_train_worker("worker-1")
    client = stack.client()
    job_id = _start_job(client, tmp_path)
    step = _wait_checkpoint(stack, job_id, "worker-1")
    _pool_process(worker).suspend()
    tree = _tree(worker.pid)

    signalled = time.monotonic()
    worker.send_signal(signal.SIGINT)
    time.sleep(2)
    assert worker.poll() is None and _job(stack, job_id).status == "running"
    if force == "second_signal":
        worker.send_signal(signal.SIGINT)
    took = _wait_gone(tree, signalled, bound_s=15)
    print(f"worker gone {took:.1f} s after SIGINT ({force})")
    if force == "second_signal":
        assert worker.wait() == EX_SOFTWARE
    _assert_handed_back(stack, job_id, attempt=1)

    stack.start_train_worker("worker-2")
    _assert_resumed(client, job_id, from_step=step, logs=stack.log("worker-2"))


def test_beat_stops_at_once(embedded_stack: Stack) -> None:
    stack = embedded_stack
    stack._spawn("beat", "beat")
    deadline = time.monotonic() + 60
    while "Starting..." not in stack.log("beat"):
        assert time.monotonic() < deadline, stack.log("beat")
        time.sleep(0.2)
    beat = stack.processes["beat"]
    tree = _tree(beat.pid)
    signalled = time.monotonic()
    beat.send_signal(signal.SIGTERM)
    _wait_gone(tree, signalled, bound_s=10)
    assert beat.wait() == 0


@pytest.mark.slow
def test_killed_serve_leaves_no_worker_behind(embedded_stack: Stack) -> None:
    """SIGKILL can't be handled: the workers learn of it from Linux (PR_SET_PDEATHSIG) and stop."""
    stack = embedded_stack
    stack.start_api(with_worker=True)
    serve = stack.processes["api"]
    deadline = time.monotonic() + 60
    while len(tree := _tree(serve.pid)) < 5:  # the workers and their pool processes have started
        assert time.monotonic() < deadline, tree
        time.sleep(0.2)
    signalled = time.monotonic()
    serve.kill()
    took = _wait_gone(tree, signalled)
    print(f"the workers of a killed serve gone {took:.1f} s later")


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_on_the_full_stack_hands_the_job_back(
    full_stack: Stack, tmp_path: Path, sig: signal.Signals
) -> None:
    """A standalone worker over Redis, PostgreSQL and S3, where Celery's loop is event-driven: the
    handed-back job is not lost with the stopping worker's connection and resumes on the next
    worker. SIGINT (Ctrl+C) does what SIGTERM does."""
    stack = full_stack
    stack.start_api()
    worker = stack.start_train_worker("worker-1")
    stack.wait_consuming("worker-1")
    client = stack.client()
    job_id = _start_job(client, tmp_path)
    step = _wait_checkpoint(stack, job_id, "worker-1")
    tree = _tree(worker.pid)

    signalled = time.monotonic()
    worker.send_signal(sig)
    took = _wait_gone(tree, signalled)
    print(f"full-stack worker gone {took:.1f} s after {sig.name}")
    assert worker.wait() == 0
    _assert_handed_back(stack, job_id, attempt=1)

    stack.start_train_worker("worker-2")
    _assert_resumed(client, job_id, from_step=step, logs=stack.log("worker-2"))


# --- the test run itself ------------------------------------------------------------------------------

_FIXTURE_TEST = """
import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture
def server(tmp_path):
    # Like the S3 server's fixture: a child in a session of its own, stopped only by teardown.
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Path("{pid_file}").write_text(str(child.pid))
    yield child
    child.terminate()
    child.wait()


def test_waits(server):
    time.sleep(300)
"""


def test_terminated_test_run_tears_its_fixtures_down(tmp_path: Path) -> None:
    """CI stops a run with SIGTERM: fixture teardown must still run (tests/conftest.py turns it into
    a KeyboardInterrupt), or servers that fixtures start in sessions of their own outlive the run."""
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_inner.py").write_text(_FIXTURE_TEST.replace("{pid_file}", str(pid_file)))
    conftest = Path(__file__).with_name("conftest.py")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-p",
            "tests.conftest",
            str(tmp_path / "test_inner.py"),
        ],
        cwd=conftest.parent.parent,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and run.poll() is None, "the inner run never started"
            time.sleep(0.1)
        child = psutil.Process(int(pid_file.read_text()))
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=BOUND_S)
        child.wait(timeout=5)  # raises psutil.TimeoutExpired if teardown never stopped it
    finally:
        if run.poll() is None:
            run.kill()
        if pid_file.exists() and pid_file.read_text() and psutil.pid_exists(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()
