"""Faults on the full stack (issue 11): PostgreSQL, Redis and the S3 server with the API, workers
and beat as separate processes. Each case checks what a user relies on: no job lost, none run or
stored twice, none stuck, and prints how long the stack took to recover (tests/fault_injection.py
records it in recovery.json under the test's folder). Faults are injected without touching the
machine's shared services: a private Redis, and relays in front of PostgreSQL and the S3 server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from cli.client import ApiProblem, AtelierClient
from cli.demo import make_dataset_zip
from tests.fault_injection import CuttableRelay, PrivateRedis, RecoveryLog
from tests.s3_server import S3Server
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "canceled"}


# --- helpers -----------------------------------------------------------------------------------------


def _job_body(dataset_id: str, **training: object) -> dict[str, Any]:
    return {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4, "alpha": 4},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "batch_size": 1, "seed": 1, **training},
    }


def _dataset(client: AtelierClient, tmp_path: Path, name: str, count: int = 4) -> str:
    return client.upload_dataset([make_dataset_zip(tmp_path / f"{name}.zip", count=count)])["id"]


def _events(client: AtelierClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", limit=1000)["data"]


def _logs(stack: Stack) -> str:
    return "\n".join(f"--- {name} ---\n{stack.log(name)[-2500:]}" for name in stack.processes)


def _job_or_none(client: AtelierClient, job_id: str) -> dict[str, Any] | None:
    """The job, or None while the API cannot answer (its database or itself is down)."""
    try:
        return client.job(job_id)
    except (ApiProblem, httpx.HTTPError):
        return None


def _wait_for(what: str, check: Callable[[], Any], stack: Stack, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{_logs(stack)}")


def _wait_terminal(client: AtelierClient, job_id: str, stack: Stack, timeout_s: float = 180) -> dict:
    def done() -> dict[str, Any] | None:
        job = _job_or_none(client, job_id)
        return job if job and job["status"] in TERMINAL else None

    return _wait_for(f"job {job_id} to finish", done, stack, timeout_s)


def _direct_db(stack: Stack) -> str:
    """The test's own way into the stack's database, past any relay."""
    return stack.env["ATELIER_DIRECT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


def _artifact_folders(s3_server: S3Server, stack: Stack) -> Counter[str]:
    """Job id -> how many attempt folders with a manifest (a stored artifact) S3 holds for it."""
    client = s3_server.client()
    folders: Counter[str] = Counter()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["ATELIER_S3_BUCKET"], Prefix="tenants/"
    ):
        for item in page.get("Contents", []):
            parts = item["Key"].split("/")  # tenants/T/jobs/J/attempt-N/manifest.json
            if len(parts) == 6 and parts[2] == "jobs" and parts[5] == "manifest.json":
                folders[parts[3]] += 1
    return folders


def _assert_ran_once(client: AtelierClient, job_id: str, s3_folders: Counter[str]) -> dict[str, Any]:
    """Succeeded once: one `succeeded` event, one started event per attempt (a later attempt only
    after the earlier one was given up and resumed), one artifact row and one stored artifact."""
    job = client.job(job_id)
    assert job["status"] == "succeeded", job["error"]
    events = _events(client, job_id)
    types = [e["type"] for e in events]
    assert types.count("succeeded") == 1, types
    started = [e["attempt"] for e in events if e["type"] == "started"]
    assert started == list(range(1, job["attempt"] + 1)), events
    artifacts = [a for a in client.get("/v1/artifacts", limit=100)["data"] if a["job_id"] == job_id]
    assert [a["id"] for a in artifacts] == [job["artifact_id"]]
    assert s3_folders[job_id] == 1, s3_folders
    return job


@pytest.fixture
def recovery(tmp_path: Path) -> RecoveryLog:
    return RecoveryLog(tmp_path)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(private_redis: PrivateRedis) -> str:
    """Overrides the shared Redis database (tests/service_stack.py) for full_stack here: other
    sessions' tests flush it while they run, which loses this stack's messages, and flushing it
    here would lose theirs. A Redis of the test's own also lets the Redis case restart it."""
    return private_redis.url


@pytest.fixture
def stack(full_stack: Stack, postgres_url: str) -> Stack:
    full_stack.env["ATELIER_DIRECT_DATABASE_URL"] = postgres_url
    return full_stack


# --- Redis restarted mid-job -------------------------------------------------------------------------


def test_redis_restart_mid_job_loses_no_job(
    private_redis: PrivateRedis, stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    assert stack.env["ATELIER_BROKER_URL"] == private_redis.url
    # A queued job whose message died with Redis is re-sent once it waited this long unclaimed.
    stack.env["ATELIER_QUEUED_REDISPATCH_S"] = "10"
    stack.start_api()
    stack.start_workers()
    stack.wait_consuming("worker")
    stack.wait_consuming("worker-generate")
    client = stack.client("acme")
    dataset = _dataset(client, tmp_path, "acme")
    # Long enough to be mid-training at the restart: on an idle machine tiny-sd trains ~50 steps a
    # second, and 40 steps were done before Redis went down (the test then waited for a finished
    # job to go on).
    running = client.create_job(_job_body(dataset, max_steps=400, checkpoint_every=20))["id"]
    _wait_for("the first job to train", lambda: client.job(running)["progress"]["step"] >= 2, stack)
    # One training worker, one job at a time: the second waits in Redis, taken by no worker yet.
    waiting = client.create_job(_job_body(dataset, seed=2))["id"]
    assert client.job(waiting)["status"] == "queued"

    private_redis.restart()  # killed, back empty: both jobs' messages are gone
    cleared = time.monotonic()
    at_restart = client.job(running)
    assert at_restart["status"] == "running", f"the job was no longer running at the fault: {at_restart}"
    step_at_restart = at_restart["progress"]["step"]
    _wait_for(
        "the running job to go on", lambda: client.job(running)["progress"]["step"] > step_at_restart, stack
    )
    running_again = time.monotonic() - cleared
    _wait_for("the waiting job to start", lambda: client.job(waiting)["status"] != "queued", stack)
    waiting_started = time.monotonic() - cleared
    # The worker consumes again: a job created after the restart runs too.
    after = client.create_job(_job_body(dataset, seed=3))["id"]

    jobs = [running, waiting, after]
    finals = {running: _wait_terminal(client, running, stack)}
    running_done = time.monotonic() - cleared
    finals |= {job_id: _wait_terminal(client, job_id, stack) for job_id in jobs[1:]}
    all_done = time.monotonic() - cleared
    folders = _artifact_folders(s3_server, stack)
    for job_id in jobs:
        assert finals[job_id]["status"] == "succeeded", (finals[job_id]["error"], _logs(stack))
        _assert_ran_once(client, job_id, folders)
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited\n{_logs(stack)}"
    attempts = {finals[j]["attempt"] for j in jobs}
    recovery.record(
        "redis_restart",
        f"running job went on (attempts {sorted(attempts)}); the queued job's lost message was re-sent "
        "by the beat; a new job ran",
        running_job_progress=running_again,
        running_job_succeeded=running_done,
        queued_job_started=waiting_started,
        all_three_succeeded=all_done,
    )


# --- PostgreSQL unavailable for 30 s mid-job ---------------------------------------------------------

OUTAGE_S = 30.0


def test_postgres_down_30s_mid_job(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    port = int(stack.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    relay = CuttableRelay("127.0.0.1", port)
    try:
        stack.env["ATELIER_DATABASE_URL"] = stack.database_url.replace(f":{port}/", f":{relay.port}/")
        stack.start_api()
        stack.start_workers()
        stack.wait_consuming("worker")
        stack.wait_consuming("worker-generate")
        client = stack.client("acme")
        dataset = _dataset(client, tmp_path, "acme")
        job_id = client.create_job(_job_body(dataset, max_steps=60, checkpoint_every=10))["id"]
        _wait_for("a checkpoint", lambda: client.job(job_id)["checkpoint_step"], stack)

        relay.cut()
        cut_at = time.monotonic()
        # The API cannot read the job now: it answers a problem, retryable, never a wrong job.
        with pytest.raises(ApiProblem) as down:
            client.job(job_id)
        assert down.value.status == 503 and down.value.body["code"] == "database_unavailable"
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
        relay.restore()
        cleared = time.monotonic()

        def api_answers() -> dict[str, Any] | None:
            return _job_or_none(client, job_id)

        before = _wait_for("the API to answer again", api_answers, stack, timeout_s=60)
        api_back = time.monotonic() - cleared

        def progressing() -> bool:
            job = _job_or_none(client, job_id)
            return bool(job) and (
                job["status"] in TERMINAL
                or job["attempt"] > before["attempt"]
                or (job["status"] == "running" and job["progress"]["step"] > before["progress"]["step"])
            )

        _wait_for("the job to run again", progressing, stack)
        running_again = time.monotonic() - cleared
        final = _wait_terminal(client, job_id, stack, timeout_s=240)
        finished = time.monotonic() - cleared
        assert final["status"] == "succeeded", (final["error"], _logs(stack))
        job = _assert_ran_once(client, job_id, _artifact_folders(s3_server, stack))
        resumed = [e for e in _events(client, job_id) if e["type"] == "resumed"]
        if job["attempt"] > 1:  # a later attempt went on from a checkpoint, not from scratch
            assert resumed and resumed[-1]["data"]["from_step"] > 0
        for name, process in stack.processes.items():
            assert process.poll() is None, f"{name} exited\n{_logs(stack)}"
        recovery.record(
            "postgres_down_30s",
            f"API answered 503 database_unavailable; job finished on attempt {job['attempt']}"
            + (f", resumed from step {resumed[-1]['data']['from_step']}" if resumed else ""),
            api_answers=api_back,
            job_running_again=running_again,
            job_succeeded=finished,
        )
    finally:
        stack.stop()
        relay.close()


# --- the S3 server down while the artifact uploads ---------------------------------------------------

S3_DOWN_S = 20.0


def test_s3_down_while_the_artifact_uploads(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    host, port = s3_server.endpoint_url.rsplit("/", 1)[1].split(":")
    relay = CuttableRelay(host, int(port))
    try:
        stack.env["ATELIER_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{relay.port}"
        stack.start_api()
        stack.start_workers()
        stack.wait_consuming("worker")
        stack.wait_consuming("worker-generate")
        client = stack.client("acme")
        dataset = _dataset(client, tmp_path, "acme")
        # No checkpoints and no samples: once the data is loaded, only the artifact needs S3.
        job_id = client.create_job(_job_body(dataset, max_steps=40))["id"]
        _wait_for("training to begin", lambda: client.job(job_id)["progress"]["step"] >= 1, stack)
        relay.cut()
        _wait_for("the artifact upload to hit the dead S3 server", lambda: relay.refused, stack)
        time.sleep(S3_DOWN_S)
        assert client.job(job_id)["status"] == "running", _logs(stack)  # waiting, not failed
        relay.restore()
        cleared = time.monotonic()
        final = _wait_terminal(client, job_id, stack)
        finished = time.monotonic() - cleared
        assert final["status"] == "succeeded", (final["error"], _logs(stack))
        # The trained result was kept: the same attempt stored it once S3 came back.
        job = _assert_ran_once(client, job_id, _artifact_folders(s3_server, stack))
        assert job["attempt"] == 1
        recovery.record(
            "s3_down_during_artifact_upload",
            f"upload retried with backoff ({relay.refused} refused connections over {S3_DOWN_S:.0f} s); "
            "the same attempt stored the artifact",
            job_succeeded=finished,
        )
    finally:
        stack.stop()
        relay.close()


# --- the API killed mid-upload -------------------------------------------------------------------------


def _dataset_rows(stack: Stack) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(_direct_db(stack)) as conn:
        rows = conn.execute("SELECT id, status, error_code FROM datasets ORDER BY created_at").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _dataset_keys(s3_server: S3Server, stack: Stack, dataset_id: str | None = None) -> list[str]:
    client = s3_server.client()
    try:
        listing = client.list_objects_v2(Bucket=stack.env["ATELIER_S3_BUCKET"], Prefix="tenants/")
    except client.exceptions.NoSuchBucket:
        return []  # the API makes its bucket when it first stores something
    keys = [item["Key"] for item in listing.get("Contents", [])]
    return [k for k in keys if "/datasets/" in k and (dataset_id is None or f"/{dataset_id}/" in k)]


def _kill_api(stack: Stack) -> None:
    api = stack.processes["api"]
    os.killpg(api.pid, signal.SIGKILL)
    api.wait(timeout=10)


def _multipart(zip_path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{zip_path.name}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    return head + zip_path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), boundary


def test_api_killed_mid_upload_leaves_no_half_written_dataset(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    # An upload still validating this long after it began was cut off: the beat cleans it up.
    stack.env["ATELIER_DATASET_UPLOAD_TIMEOUT_S"] = "20"
    stack.start_api()
    stack._spawn(
        "worker-maintenance", "worker", "--queues", "maintenance", "--beat", "--max-tasks-per-child", "0"
    )
    stack.wait_consuming("worker-maintenance")
    client = stack.client("acme")
    archive = make_dataset_zip(tmp_path / "big.zip", count=300)

    # 1. Killed while the request body streams in: nothing was stored, no row exists.
    body, boundary = _multipart(archive)
    half_sent, killed = threading.Event(), threading.Event()

    def trickle() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        half_sent.set()
        killed.wait(30)
        yield body[len(body) // 2 :]

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server dies under it
            client.http.post(
                "/v1/datasets",
                content=trickle(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )

    sender = threading.Thread(target=send)
    sender.start()
    assert half_sent.wait(30)
    time.sleep(0.5)
    _kill_api(stack)
    killed.set()
    sender.join(30)
    assert _dataset_rows(stack) == [] and _dataset_keys(s3_server, stack) == []
    stack.start_api(same_port=True)

    # 2. Killed while the server stores the accepted images: a row and some objects exist.
    uploader = threading.Thread(target=lambda: _upload_ignoring_errors(client, archive))
    uploader.start()

    def half_written() -> str | None:
        rows = [r for r in _dataset_rows(stack) if r[1] == "validating"]
        return rows[0][0] if rows and _dataset_keys(s3_server, stack, rows[0][0]) else None

    interrupted = _wait_for("the upload to be half stored", half_written, stack, timeout_s=60)
    _kill_api(stack)
    killed_at = time.monotonic()
    uploader.join(30)
    assert _dataset_keys(s3_server, stack, interrupted), "the kill came after the upload ended"
    stack.start_api(same_port=True)
    api_back = time.monotonic() - killed_at

    # The retry succeeds at once, while the beat cleans up the interrupted one.
    retried = client.upload_dataset([archive])
    assert retried["status"] == "ready" and retried["image_count"] == 300
    retry_done = time.monotonic() - killed_at

    def cleaned() -> bool:
        statuses = {r[0]: r for r in _dataset_rows(stack)}
        return statuses[interrupted][1] == "invalid" and not _dataset_keys(s3_server, stack, interrupted)

    _wait_for("the interrupted upload to be cleaned up", cleaned, stack, timeout_s=120)
    swept = time.monotonic() - killed_at
    rows = {r[0]: r for r in _dataset_rows(stack)}
    assert rows == {
        interrupted: (interrupted, "invalid", "upload_interrupted"),
        retried["id"]: (retried["id"], "ready", None),
    }
    seen = client.dataset(interrupted)
    assert seen["status"] == "invalid"
    with pytest.raises(ApiProblem) as refused:  # never trainable
        client.create_job(_job_body(interrupted))
    assert refused.value.body["code"] == "dataset_not_ready"
    assert len(_dataset_keys(s3_server, stack, retried["id"])) > 300  # images, captions, manifest
    recovery.record(
        "api_killed_mid_upload",
        "killed mid-body: nothing stored; killed mid-store: row and partial objects, swept to "
        "invalid/upload_interrupted with no objects; the retried upload succeeded",
        api_restarted=api_back,
        retry_succeeded=retry_done,
        interrupted_upload_cleaned=swept,
    )


def _upload_ignoring_errors(client: AtelierClient, archive: Path) -> None:
    with contextlib.suppress(ApiProblem, httpx.HTTPError):  # the server dies under it
        client.upload_dataset([archive])


# --- twenty concurrent creates with one Idempotency-Key ----------------------------------------------


def test_twenty_concurrent_creates_with_one_key_make_one_job(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    stack.start_api()
    stack.start_workers()
    client = stack.client("acme")
    body = _job_body(_dataset(client, tmp_path, "acme"))
    key = f"create-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(20)
    api_key = client.http.headers["Authorization"]

    def create(_: int) -> httpx.Response:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            barrier.wait()
            return http.post(
                "/v1/jobs", json=body, headers={"Authorization": api_key, "Idempotency-Key": key}
            )

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(create, range(20)))
    answered = time.monotonic() - started

    assert sorted(r.status_code for r in responses) == [200] * 19 + [201], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    job_id = ids.pop()
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses if r.status_code == 200]
    assert replayed == ["true"] * 19
    with psycopg.connect(_direct_db(stack)) as conn:
        rows = conn.execute("SELECT id FROM jobs WHERE idempotency_key = %s", (key,)).fetchall()
        assert rows == [(job_id,)]
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    stack.wait_consuming("worker")
    final = _wait_terminal(client, job_id, stack)
    assert final["status"] == "succeeded", (final["error"], _logs(stack))
    job = _assert_ran_once(client, job_id, _artifact_folders(s3_server, stack))
    assert job["attempt"] == 1
    recovery.record(
        "twenty_creates_one_key",
        "one 201 and nineteen 200 replays (Idempotent-Replayed), one job row, trained once",
        all_twenty_answered=answered,
    )


# --- thirty jobs from two tenants on two workers -----------------------------------------------------


def test_thirty_jobs_two_tenants_two_workers_each_once(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    stack.env["ATELIER_TORCH_THREADS"] = "1"  # two trainers on a shared machine
    stack.start_topology(train_workers=2)
    tenants = {name: stack.client(name) for name in ("acme", "globex")}
    datasets = {name: _dataset(client, tmp_path, name) for name, client in tenants.items()}
    orders = [(name, n) for name in tenants for n in range(15)]

    def submit(order: tuple[str, int]) -> tuple[str, str]:
        name, n = order
        job = tenants[name].create_job(_job_body(datasets[name], max_steps=2, seed=n), idempotency_key=f"{n}")
        return name, job["id"]

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        submitted = list(pool.map(submit, orders))
    assert len({job_id for _, job_id in submitted}) == 30

    finals = {
        job_id: _wait_terminal(tenants[name], job_id, stack, timeout_s=600) for name, job_id in submitted
    }
    makespan = time.monotonic() - started
    folders = _artifact_folders(s3_server, stack)
    workers: Counter[str] = Counter()
    for name, job_id in submitted:
        assert finals[job_id]["status"] == "succeeded", (finals[job_id]["error"], _logs(stack))
        job = _assert_ran_once(tenants[name], job_id, folders)
        assert job["attempt"] == 1
        started_event = next(e for e in _events(tenants[name], job_id) if e["type"] == "started")
        workers[started_event["data"]["worker"]] += 1
    assert sum(folders.values()) == 30
    # Each tenant sees exactly its own fifteen.
    for name, client in tenants.items():
        mine = {job_id for owner, job_id in submitted if owner == name}
        assert {j["id"] for j in client.jobs(limit=100)["data"]} == mine
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited\n{_logs(stack)}"
    recovery.record(
        "thirty_jobs_two_tenants_two_workers",
        f"all 30 succeeded once, on attempt 1, in {len(workers)} pool processes",
        all_thirty_succeeded=makespan,
    )
