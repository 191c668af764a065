"""What the full-stack fault tests share (tests/test_faults_*.py): job and dataset helpers, waits that
print the stack's logs on a timeout, the checks that a job ran and was stored once, and the fixtures
(a private Redis for the stack, the recovery log). The fixtures are shared by assignment
(`stack = fixtures.stack`); `redis_url` overrides tests/service_stack.py's for those modules only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.client import ApiProblem, AtelierClient
from cli.demo import make_dataset_zip
from tests.fault_injection import PrivateRedis, RecoveryLog
from tests.s3_server import S3Server
from tests.service_stack import Stack

TERMINAL = {"succeeded", "failed", "canceled"}


def job_body(dataset_id: str, **training: object) -> dict[str, Any]:
    return {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4, "alpha": 4},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "batch_size": 1, "seed": 1, **training},
    }


def new_dataset(client: AtelierClient, tmp_path: Path, name: str, count: int = 4) -> str:
    return client.upload_dataset([make_dataset_zip(tmp_path / f"{name}.zip", count=count)])["id"]


def job_events(client: AtelierClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", limit=1000)["data"]


def stack_logs(stack: Stack) -> str:
    return "\n".join(f"--- {name} ---\n{stack.log(name)[-2500:]}" for name in stack.processes)


def job_or_none(client: AtelierClient, job_id: str) -> dict[str, Any] | None:
    """The job, or None while the API cannot answer (its database or itself is down)."""
    try:
        return client.job(job_id)
    except (ApiProblem, httpx.HTTPError):
        return None


def wait_for(what: str, check: Callable[[], Any], stack: Stack, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{stack_logs(stack)}")


def wait_terminal(client: AtelierClient, job_id: str, stack: Stack, timeout_s: float = 180) -> dict:
    def done() -> dict[str, Any] | None:
        job = job_or_none(client, job_id)
        return job if job and job["status"] in TERMINAL else None

    return wait_for(f"job {job_id} to finish", done, stack, timeout_s)


def direct_db(stack: Stack) -> str:
    """The test's own way into the stack's database, past any relay."""
    return stack.env["ATELIER_DIRECT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


def artifact_folders(s3_server: S3Server, stack: Stack) -> Counter[str]:
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


def assert_ran_once(client: AtelierClient, job_id: str, s3_folders: Counter[str]) -> dict[str, Any]:
    """Succeeded once: one `succeeded` event, one started event per attempt (a later attempt only
    after the earlier one was given up and resumed), one artifact row and one stored artifact."""
    job = client.job(job_id)
    assert job["status"] == "succeeded", job["error"]
    events = job_events(client, job_id)
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
