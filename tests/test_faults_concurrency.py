"""Faults on the full stack (issue 11) under concurrency: twenty concurrent creates with one
Idempotency-Key, and thirty jobs from two tenants on two workers. Each case checks what a user
relies on: no job lost, none run or stored twice, none stuck, and prints how long the stack took to
recover (tests/fault_injection.py records it in recovery.json under the test's folder).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests import fault_fixtures as fixtures
from tests.fault_fixtures import (
    artifact_folders,
    assert_ran_once,
    direct_db,
    job_body,
    job_events,
    new_dataset,
    stack_logs,
    wait_terminal,
)
from tests.fault_injection import RecoveryLog
from tests.s3_server import S3Server
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The stack and its private Redis (tests/fault_fixtures.py), shared by assignment.
recovery, private_redis, redis_url, stack = (
    fixtures.recovery,
    fixtures.private_redis,
    fixtures.redis_url,
    fixtures.stack,
)


# --- twenty concurrent creates with one Idempotency-Key ----------------------------------------------


def test_twenty_concurrent_creates_with_one_key_make_one_job(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    stack.start_api()
    stack.start_workers()
    client = stack.client("acme")
    body = job_body(new_dataset(client, tmp_path, "acme"))
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
    with psycopg.connect(direct_db(stack)) as conn:
        rows = conn.execute("SELECT id FROM jobs WHERE idempotency_key = %s", (key,)).fetchall()
        assert rows == [(job_id,)]
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    stack.wait_consuming("worker")
    final = wait_terminal(client, job_id, stack)
    assert final["status"] == "succeeded", (final["error"], stack_logs(stack))
    job = assert_ran_once(client, job_id, artifact_folders(s3_server, stack))
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
    datasets = {name: new_dataset(client, tmp_path, name) for name, client in tenants.items()}
    orders = [(name, n) for name in tenants for n in range(15)]

    def submit(order: tuple[str, int]) -> tuple[str, str]:
        name, n = order
        job = tenants[name].create_job(job_body(datasets[name], max_steps=2, seed=n), idempotency_key=f"{n}")
        return name, job["id"]

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        submitted = list(pool.map(submit, orders))
    assert len({job_id for _, job_id in submitted}) == 30

    finals = {
        job_id: wait_terminal(tenants[name], job_id, stack, timeout_s=600) for name, job_id in submitted
    }
    makespan = time.monotonic() - started
    folders = artifact_folders(s3_server, stack)
    workers: Counter[str] = Counter()
    for name, job_id in submitted:
        assert finals[job_id]["status"] == "succeeded", (finals[job_id]["error"], stack_logs(stack))
        job = assert_ran_once(tenants[name], job_id, folders)
        assert job["attempt"] == 1
        started_event = next(e for e in job_events(tenants[name], job_id) if e["type"] == "started")
        workers[started_event["data"]["worker"]] += 1
    assert sum(folders.values()) == 30
    # Each tenant sees exactly its own fifteen.
    for name, client in tenants.items():
        mine = {job_id for owner, job_id in submitted if owner == name}
        assert {j["id"] for j in client.jobs(limit=100)["data"]} == mine
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited\n{stack_logs(stack)}"
    recovery.record(
        "thirty_jobs_two_tenants_two_workers",
        f"all 30 succeeded once, on attempt 1, in {len(workers)} pool processes",
        all_thirty_succeeded=makespan,
    )
