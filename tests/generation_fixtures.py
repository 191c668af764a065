"""What the generation tests share (tests/test_generation_*.py): rows in each state, a lease made to
expire, whole attempts on tiny-sd, and the full stack's waits and bucket listing.

`gen_settings` and `redis_url` are fixtures: a test module imports the ones it uses, as tests/conftest.py
imports the S3 server's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope, upgrade
from core.generation import states as generation_states
from core.generation.images import generation_prefix
from core.generation.params import GenerationSpec
from core.ids import new_id
from core.models import Generation, JobStatus
from core.storage.base import Storage
from core.timeutil import utcnow
from tests.db_fixtures import make_tenant
from tests.fault_injection import PrivateRedis
from tests.s3_server import S3Server
from tests.service_stack import Stack
from tests.service_stack import test_model_cache as model_cache_folder

TERMINAL = {"succeeded", "failed", "canceled"}


# --- rows -----------------------------------------------------------------------------------------------


def add_generation(session: Session, tenant_id: str, *, max_attempts: int = 3, **spec: Any) -> str:
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


def fresh_row(session: Session, generation_id: str) -> Generation:
    row = session.get(Generation, generation_id, populate_existing=True)
    assert row is not None
    return row


def claim_now(session: Session, generation_id: str, worker_id: str = "host:1", lease_s: float = 60) -> int:
    attempt = generation_states.claim(
        session=session, generation_id=generation_id, worker_id=worker_id, lease_s=lease_s
    )
    assert attempt is not None
    return attempt


def expire_lease(session: Session, generation_id: str) -> None:
    """As if the worker's last heartbeat were a lease ago: it died, or stalls."""
    session.execute(
        update(Generation)
        .where(Generation.id == generation_id)
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


# --- whole attempts in-process, on tiny-sd --------------------------------------------------------------


@pytest.fixture
def gen_settings(api_settings: Settings) -> Settings:
    """SQLite and local storage, tiny-sd on the CPU, a heartbeat five times a second."""
    upgrade(api_settings.database_url)
    api_settings.model_cache = Path(model_cache_folder())
    api_settings.device = "cpu"
    api_settings.heartbeat_s, api_settings.lease_s = 0.2, 2.0
    return api_settings


def queued_generation(settings: Settings, **spec: Any) -> tuple[str, str]:
    """(tenant id, generation id) of a small queued generation."""
    with session_scope(settings.database_url) as session:
        tenant_id = make_tenant(session)
        size = {"width": 32, "height": 32, "steps": 2, "num_images": 2} | spec
        return tenant_id, add_generation(session, tenant_id, **size)


def take_over(settings: Settings, generation_id: str) -> None:
    """What the reaper and another worker do while the first attempt stalls: it lost the lease."""
    with session_scope(settings.database_url) as session:
        for _ in range(20):
            expire_lease(session, generation_id)
            # A heartbeat landing between the two renews the lease, and the reaper rightly spares it.
            if generation_states.reap_stale(session=session) == [generation_id]:
                break
        else:
            raise AssertionError("the attempt's heartbeat renewed its lease every time")
        assert claim_now(session, generation_id, worker_id="other:2") == 2


def stored_keys(storage: Storage, tenant_id: str, generation_id: str) -> list[str]:
    return storage.list(generation_prefix(tenant_id, generation_id))


# --- the full stack -------------------------------------------------------------------------------------


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


def wait_for(what: str, check: Callable[[], Any], stack: Stack, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    logs = "\n".join(f"--- {name} ---\n{stack.log(name)[-2500:]}" for name in stack.processes)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def full_log(stack: Stack, name: str) -> str:
    """All of a process's log (Stack.log keeps only its tail)."""
    return (stack.home / f"{name}.log").read_text(errors="replace")


def s3_objects(s3_server: S3Server, stack: Stack, prefix: str) -> list[str]:
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["ATELIER_S3_BUCKET"], Prefix=prefix + "/"
    ):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)
