"""Webhook delivery: at-least-once from the outbox, retries and their limit, broker outages, workers
that die mid-POST, and the URL guard and TLS checks at delivery time.

Deliveries go to a real HTTP server on 127.0.0.1; the broker is the `doorbell` recorder and the
Celery task functions are called as a worker would call them (tests/webhook_fixtures.py). Database
tests run on SQLite and PostgreSQL (`db_url`). No torch: nothing here trains.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update

import worker.tasks
from core.config import Settings, reset_settings
from core.db import new_session, session_scope
from core.jobs import states as jobs
from core.models import Job, JobStatus, WebhookDelivery
from core.timeutil import utcnow
from core.webhooks import delivery as webhook_delivery
from core.webhooks.url_guard import check_url
from tests.webhook_fixtures import Doorbell, Receiver, deliveries, new_job, step, tenant_secret, verify


def test_a_jobs_lifecycle_reaches_the_receiver_signed_and_filtered(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    s = hook_settings
    tenant_id, job_id = new_job(s, receiver.url)  # default filter: started and the terminal events
    attempt = step(s, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    step(s, jobs.record_checkpoint, job_id=job_id, attempt=attempt, step=5, key="k/5")
    step(s, jobs.finish, job_id=job_id, attempt=attempt, status=JobStatus.failed, error_code="oom")
    assert doorbell.drain() == ["succeeded", "succeeded"]

    assert [r.json["type"] for r in receiver.requests] == ["job.started", "job.failed"]
    secret = tenant_secret(s, tenant_id)
    for request in receiver.requests:
        assert request.path == "/hooks/atelier"
        assert verify(secret, request.headers, request.body)
        assert request.headers["content-type"] == "application/json"
        assert request.json["data"]["id"] == job_id
    started, failed = (r.json for r in receiver.requests)
    assert (started["data"]["status"], started["data"]["attempt"]) == ("running", 1)
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["error"] == {"code": "oom", "message": None}
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 2
    rows = deliveries(s, job_id)
    assert [(r.event_type, r.status, r.attempts) for r in rows] == [
        ("job.started", "succeeded", 1),
        ("job.failed", "succeeded", 1),
    ]
    assert [r.id for r in rows] == [r.headers["webhook-id"] for r in receiver.requests]

    # An explicit filter: checkpoints only, so neither the start nor the cancel is sent.
    _, other = new_job(s, receiver.url, ["checkpoint"])
    attempt = step(s, jobs.claim, job_id=other, worker_id="w1", lease_s=60)
    step(s, jobs.record_checkpoint, job_id=other, attempt=attempt, step=5, key="k/5")
    step(s, jobs.finish, job_id=other, attempt=attempt, status=JobStatus.canceled)
    doorbell.drain()
    assert [r.json["type"] for r in receiver.requests[2:]] == ["job.checkpoint"]
    assert receiver.requests[2].json["data"]["checkpoint_step"] == 5

    # A job without a webhook leaves no outbox rows and rings nothing.
    _, quiet = new_job(s, None)
    step(s, jobs.claim, job_id=quiet, worker_id="w1", lease_s=60)
    assert deliveries(s, quiet) == [] and doorbell.sent == []


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_succeeds(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    receiver.script = [500, 503]
    tenant_id, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["pending", "pending", "succeeded"]

    assert len(receiver.requests) == 3
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1  # the same event, byte for byte
    secret = tenant_secret(hook_settings, tenant_id)
    assert all(verify(secret, r.headers, r.body) for r in receiver.requests)
    (row,) = deliveries(hook_settings, job_id)
    assert (row.id, row.status, row.attempts) == (receiver.requests[0].headers["webhook-id"], "succeeded", 3)
    assert [a["status_code"] for a in row.attempt_log] == [500, 503, 204]
    assert row.delivered_at is not None


def test_attempts_stop_at_the_limit_and_never_touch_the_job(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_WEBHOOK_MAX_ATTEMPTS", "3")
    reset_settings()
    receiver.script = [500] * 10
    _, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["pending", "pending", "failed"]
    (row,) = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 500)
    with new_session(hook_settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.attempt) == ("running", 1)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    settings = Settings(webhook_retry_base_s=5, webhook_retry_factor=4, webhook_retry_max_s=6 * 3600)
    low = [webhook_delivery.backoff_s(n, settings, rng=lambda: 0.0) for n in range(1, 10)]
    high = [webhook_delivery.backoff_s(n, settings, rng=lambda: 1.0) for n in range(1, 10)]
    assert low[:4] == [3.75, 15.0, 60.0, 240.0]
    assert high[:2] == [6.25, 25.0]
    assert max(high) == 6 * 3600 * 1.25 and high[-1] == high[-2]


def test_the_outbox_survives_a_broker_outage(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    doorbell.down = True
    _, job_id = new_job(hook_settings, receiver.url)
    # The event commits although its doorbell cannot ring.
    assert step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60) == 1
    (row,) = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts) == ("pending", 0)
    assert worker.tasks.dispatch_webhooks() == {"due": [row.id], "sent": []}  # still down

    doorbell.down = False
    assert worker.tasks.dispatch_webhooks() == {"due": [row.id], "sent": [row.id]}
    assert doorbell.drain() == ["succeeded"]
    assert [r.headers["webhook-id"] for r in receiver.requests] == [row.id]
    assert worker.tasks.dispatch_webhooks() == {"due": [], "sent": []}
    # A doorbell that arrives twice (beat re-send racing the original) sends once.
    assert worker.tasks.deliver_webhook(row.id) == "skipped"
    assert len(receiver.requests) == 1


def test_an_attempt_whose_worker_died_is_taken_back(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    _, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    (row,) = deliveries(hook_settings, job_id)
    doorbell.sent.clear()
    # As a worker killed mid-POST leaves it: claimed, lease run out, no result recorded.
    with session_scope(hook_settings.database_url) as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id)
            .values(status="sending", attempts=1, lease_expires_at=utcnow())
        )
    time.sleep(0.05)
    # The beat takes it back as a failed attempt, with the usual backoff; a later beat re-sends it.
    assert worker.tasks.dispatch_webhooks()["sent"] == []
    time.sleep(0.05)
    assert worker.tasks.dispatch_webhooks()["sent"] == [row.id]
    assert doorbell.drain() == ["succeeded"]
    (row,) = deliveries(hook_settings, job_id)
    assert row.attempts == 2
    assert row.attempt_log[0]["error"].startswith("interrupted")


def test_dns_rebinding_is_refused_at_delivery(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell, fake_dns: dict
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"https://hooks.example.test:{port}/hooks"
    assert str(check_url(url, allow_hosts=hook_settings.webhook_allow_hosts).address) == "93.184.216.34"
    _, job_id = new_job(hook_settings, url, ["started"])
    fake_dns["hooks.example.test"] = ["127.0.0.1"]  # re-pointed after the job was accepted
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    delivery_id, _ = doorbell.sent.pop(0)
    assert worker.tasks.deliver_webhook(delivery_id) == "pending"
    (row,) = deliveries(hook_settings, job_id)
    assert row.last_error is not None and row.last_error.startswith("url_not_allowed")
    assert "127.0.0.1" in row.last_error and row.last_status_code is None
    assert receiver.requests == []


def test_https_goes_to_the_checked_address_and_verifies_the_certificate_for_the_name(
    hook_settings: Settings,
    doorbell: Doorbell,
    fake_dns: dict,
    tls_receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Development allow-list by name, so these names may resolve to 127.0.0.1.
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", "hooks.example.test,other.example.test")
    reset_settings()
    fake_dns.update({"hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    port = tls_receiver.url.split(":")[2].split("/")[0]
    _, job_id = new_job(hook_settings, f"https://hooks.example.test:{port}/in", ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["succeeded"]
    (request,) = tls_receiver.requests
    assert (request.path, request.headers["host"]) == ("/in", f"hooks.example.test:{port}")

    # Same address, a name the certificate does not cover: TLS refuses, nothing is posted.
    _, job_id = new_job(hook_settings, f"https://other.example.test:{port}/in", ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    delivery_id, _ = doorbell.sent.pop(0)
    assert worker.tasks.deliver_webhook(delivery_id) == "pending"
    (row,) = deliveries(hook_settings, job_id)
    assert row.last_error is not None and "CERTIFICATE_VERIFY_FAILED" in row.last_error
    assert len(tls_receiver.requests) == 1
