"""Per-tenant limits (core/tenants/limits.py, core/tenants/rate_limit.py): each limit's refusal as
problem+json with its stable code, defaults from settings, overrides per tenant, the usage endpoint, and the
queued-jobs limit under concurrent creates on PostgreSQL."""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from sqlalchemy.orm import Session

from core.config import Settings, get_settings, reset_settings
from core.db import new_session, session_scope
from core.errors import ApiError
from core.jobs import creation
from core.jobs import states as jobs
from core.models import Job, JobStatus
from core.storage.factory import make_storage
from core.tenants.keys import create_key
from core.tenants.limits import Limits, check_queued, lock_tenant, set_overrides
from core.tenants.rate_limit import KEY_PREFIX, WINDOW_S, RedisRateLimiter
from tests.db_fixtures import ApiTenant, insert_dataset, lora_spec, make_tenant, succeed_with_artifact

REDIS_URL = "redis://127.0.0.1:6379/0"


def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    assert body["type"].endswith(f"/{code}") and body["title"] and body["detail"]
    return body


def override(settings: Settings, tenant_id: str, **values: int | None) -> None:
    with session_scope(settings.database_url) as session:
        set_overrides(session=session, tenant_id=tenant_id, values=values)


def post_job(client: TestClient, tenant: ApiTenant, **headers: str) -> Response:
    body = {
        "base_model": "tiny-sd",
        "dataset_id": tenant.dataset_id,
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 10},
    }
    return client.post("/v1/jobs", json=body, headers={**tenant.headers, **headers})


def upload(client: TestClient, tenant: ApiTenant) -> Response:
    # Noise compresses badly, so the stored PNGs are a few kB each.
    files = [("files", (f"{i}.png", noise_png(48))) for i in range(3)]
    return client.post("/v1/datasets", files=files, headers=tenant.headers)


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- queued jobs ------------------------------------------------------------------------------------


def test_queued_job_limit_is_409_until_a_job_leaves_the_queue(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, globex: ApiTenant
) -> None:
    override(api_settings, acme.tenant_id, max_queued_jobs=2)
    first = post_job(api_client, acme, **{"Idempotency-Key": "one"})
    assert first.status_code == 201
    assert post_job(api_client, acme).status_code == 201

    refused = post_job(api_client, acme)
    body = assert_problem(refused, 409, "queued_job_limit")
    assert (body["limit"], body["queued"]) == (2, 2)
    # A retried create is answered with its job, limit or not; another tenant is not affected.
    assert post_job(api_client, acme, **{"Idempotency-Key": "one"}).status_code == 200
    assert post_job(api_client, globex).status_code == 201

    assert api_client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=acme.headers).status_code == 200
    assert post_job(api_client, acme).status_code == 201
    queued = api_client.get("/v1/jobs?status=queued", headers=acme.headers).json()["data"]
    assert len(queued) == 2


def test_defaults_come_from_settings_and_an_override_wins(
    api_client: TestClient, monkeypatch: pytest.MonkeyPatch, acme: ApiTenant, globex: ApiTenant
) -> None:
    monkeypatch.setenv("ATELIER_TENANT_MAX_QUEUED_JOBS", "1")
    reset_settings()
    override(get_settings(), acme.tenant_id, max_queued_jobs=3)
    assert [post_job(api_client, acme).status_code for _ in range(4)] == [201, 201, 201, 409]
    assert [post_job(api_client, globex).status_code for _ in range(2)] == [201, 409]

    override(get_settings(), acme.tenant_id, max_queued_jobs=None)  # cleared: the default again
    usage = api_client.get("/v1/usage", headers=acme.headers).json()
    assert usage["limits"]["max_queued_jobs"] == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_creates_cannot_overshoot_the_queued_limit(db_session: Session, db_url: str) -> None:
    tenant_id = make_tenant(db_session)
    dataset_id = insert_dataset(db_session, tenant_id)
    limits = Limits(max_running_jobs=1, max_queued_jobs=3, max_storage_bytes=10**9, requests_per_minute=10)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def create() -> None:
        session = new_session(db_url)
        try:
            barrier.wait()
            lock_tenant(session, tenant_id)
            check_queued(session=session, limits=limits, tenant_id=tenant_id)
            creation.create_job(
                session=session,
                tenant_id=tenant_id,
                spec=lora_spec(dataset_id),
                idempotency_key=None,
                max_attempts=3,
            )
            outcomes.append("created")
        except ApiError as exc:
            outcomes.append(exc.code)
        finally:
            session.close()

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] * 3 + ["queued_job_limit"] * 5
    assert db_session.query(Job).filter(Job.tenant_id == tenant_id).count() == 3


# --- storage ----------------------------------------------------------------------------------------


def test_storage_quota_refuses_uploads_and_jobs_over_it(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant
) -> None:
    override(api_settings, acme.tenant_id, max_storage_bytes=1000)
    refused = upload(api_client, acme)
    body = assert_problem(refused, 403, "storage_quota_exceeded")
    assert body["limit"] == 1000 and body["adding"] > 1000
    assert len(api_client.get("/v1/datasets", headers=acme.headers).json()["data"]) == 1  # the fixture's

    override(api_settings, acme.tenant_id, max_storage_bytes=10**6)
    created = upload(api_client, acme)
    assert created.status_code == 201, created.text
    storage = make_storage(api_settings)
    prefix = f"tenants/{acme.tenant_id}/datasets/{created.json()['id']}/"
    stored = sum(storage.size(key) for key in storage.list(prefix))
    usage = api_client.get("/v1/usage", headers=acme.headers).json()["storage_bytes"]
    assert usage == {"datasets": stored, "artifacts": 0, "total": stored}

    # An artifact counts with its files' bytes, as its manifest lists them.
    job_id = post_job(api_client, acme).json()["id"]
    manifest = {"files": [{"name": "a.safetensors", "bytes": 5000, "sha256": "0" * 64}], "method": "lora"}
    succeed_with_artifact(api_settings.database_url, job_id, prefix="tenants/x/art", manifest=manifest)
    usage = api_client.get("/v1/usage", headers=acme.headers).json()["storage_bytes"]
    assert usage == {"datasets": stored, "artifacts": 5000, "total": stored + 5000}

    override(api_settings, acme.tenant_id, max_storage_bytes=stored + 5000)  # full to the byte
    body = assert_problem(post_job(api_client, acme), 403, "storage_quota_exceeded")
    assert body["used"] == stored + 5000
    assert_problem(upload(api_client, acme), 403, "storage_quota_exceeded")


# --- requests per minute ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def limiter_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The API's rate limiter counting in the process (embedded) or in Redis (full stack)."""
    if request.param == "redis":
        monkeypatch.setenv("ATELIER_RATE_LIMIT_REDIS_URL", REDIS_URL)
    reset_settings()
    yield request.param
    reset_settings()


def _not_at_a_window_edge() -> None:
    # The count starts again at each minute: a test sending a few requests must not straddle it.
    if WINDOW_S - time.time() % WINDOW_S < 5:
        time.sleep(WINDOW_S - time.time() % WINDOW_S + 0.1)


def test_requests_over_the_rate_get_429_with_retry_after(
    api_client: TestClient, limiter_backend: str, acme: ApiTenant, globex: ApiTenant
) -> None:
    override(get_settings(), acme.tenant_id, requests_per_minute=3)
    with session_scope(get_settings().database_url) as session:
        second_key = create_key(session=session, tenant_name="acme", name="second")
    _not_at_a_window_edge()
    assert [api_client.get("/v1/jobs", headers=acme.headers).status_code for _ in range(3)] == [200] * 3

    refused = api_client.get("/v1/jobs", headers=acme.headers)
    body = assert_problem(refused, 429, "rate_limited")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= WINDOW_S
    assert (body["limit"], body["window_s"], body["retry_after_s"]) == (3, WINDOW_S, retry_after)
    # The limit is per key: the tenant's other key and other tenants are served.
    other = {"Authorization": f"Bearer {second_key.secret}"}
    assert api_client.get("/v1/jobs", headers=other).status_code == 200
    assert api_client.get("/v1/jobs", headers=globex.headers).status_code == 200
    if limiter_backend == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        for key_id in (acme.key.key_id, second_key.key_id, globex.key.key_id):
            for key in client.scan_iter(f"{KEY_PREFIX}:{key_id}:*"):
                client.delete(key)


def test_redis_counts_are_shared_by_api_processes() -> None:
    """Two limiters (as in two API processes) count one key together; the count expires."""
    key_id = f"key_test_{uuid.uuid4().hex}"
    first, second = RedisRateLimiter(REDIS_URL), RedisRateLimiter(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        allowed = [limiter.hit(key_id, 4).allowed for limiter in (first, second, first, second, first)]
        assert allowed == [True, True, True, True, False]
        (key,) = list(client.scan_iter(f"{KEY_PREFIX}:{key_id}:*"))
        assert 0 < client.ttl(key) <= 2 * WINDOW_S
        assert second.peek(key_id, 4).used == 5
    finally:
        for key in client.scan_iter(f"{KEY_PREFIX}:{key_id}:*"):
            client.delete(key)


def test_an_unreachable_redis_lets_requests_through() -> None:
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    assert all(limiter.hit("key_x", 1).allowed for _ in range(3))


# --- usage ------------------------------------------------------------------------------------------


def test_usage_shows_jobs_storage_limits_and_the_rate_window(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, globex: ApiTenant
) -> None:
    override(api_settings, acme.tenant_id, max_running_jobs=1, requests_per_minute=50)
    _not_at_a_window_edge()
    job_ids = [post_job(api_client, acme).json()["id"] for _ in range(3)]
    post_job(api_client, globex)
    with session_scope(api_settings.database_url) as session:
        assert jobs.claim(session=session, job_id=job_ids[0], worker_id="w", lease_s=60) == 1

    response = api_client.get("/v1/usage", headers=acme.headers)
    assert response.status_code == 200, response.text
    usage = response.json()
    assert usage["object"] == "usage" and usage["tenant_id"] == acme.tenant_id
    assert usage["jobs"] == {"running": 1, "queued": 2}
    assert usage["limits"] == {
        "max_running_jobs": 1,
        "max_queued_jobs": api_settings.tenant_max_queued_jobs,
        "max_storage_bytes": api_settings.tenant_max_storage_bytes,
        "requests_per_minute": 50,
    }
    rate = usage["rate"]
    assert (rate["limit"], rate["used"], rate["remaining"], rate["window_s"]) == (
        50,
        4,
        46,
        WINDOW_S,
    )  # 3 creates and this request
    assert 1 <= rate["reset_s"] <= WINDOW_S
    assert api_client.get("/v1/usage", headers=globex.headers).json()["jobs"] == {"running": 0, "queued": 1}
    assert_problem(api_client.get("/v1/usage"), 401, "unauthorized")
    with session_scope(api_settings.database_url) as session:
        assert session.get(Job, job_ids[0]).status == JobStatus.running  # type: ignore[union-attr]


# --- overrides from the CLI -------------------------------------------------------------------------


def test_cli_sets_shows_and_clears_a_tenants_overrides(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    assert (
        main(["tenants", "limits", "set", "acme", "--max-queued-jobs", "1", "--max-running-jobs", "2"]) == 0
    )
    shown = capsys.readouterr().out
    assert "max_queued_jobs      1" in shown and "max_running_jobs     2" in shown
    assert [post_job(api_client, acme).status_code for _ in range(2)] == [201, 409]
    assert post_job(api_client, globex).status_code == 201  # another tenant keeps the default

    assert main(["tenants", "limits", "clear", acme.tenant_id, "max_queued_jobs"]) == 0  # by id too
    assert post_job(api_client, acme).status_code == 201
    assert api_client.get("/v1/usage", headers=acme.headers).json()["limits"]["max_running_jobs"] == 2
    capsys.readouterr()

    assert main(["tenants", "limits", "set", "acme", "--max-queued-jobs", "0"]) == 2
    assert main(["tenants", "limits", "set", "acme"]) == 2
    assert main(["tenants", "limits", "clear", "acme", "max_gpus"]) == 2
    assert main(["tenants", "limits", "show", "initech"]) == 1
    assert "no tenant named 'initech'" in capsys.readouterr().err
