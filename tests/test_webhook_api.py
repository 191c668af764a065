"""Webhooks over the HTTP API (in-process, SQLite): the job's webhook fields, their validation, the
tenant's secret and its rotation, and the deliveries a tenant may list.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.config import Settings
from tests.db_fixtures import ApiTenant
from tests.webhook_fixtures import Doorbell, Receiver, verify, webhook_env


@pytest.fixture
def api_hooks(api_client: Any, api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The API test settings, plus the allow-list and fast retries."""
    return webhook_env(monkeypatch, api_settings.home, api_settings.database_url)


def _create(client: Any, tenant: ApiTenant, key: str | None = None, **webhook: Any) -> Any:
    body = {
        "base_model": "tiny-sd",
        "dataset_id": tenant.dataset_id,
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 10},
        **webhook,
    }
    headers = {**tenant.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/jobs", json=body, headers=headers)


@pytest.mark.parametrize(
    ("webhook", "pointer", "code"),
    [
        ({"webhook_url": "https://169.254.169.254/latest/meta-data/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "http://[::ffff:127.0.0.1]/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "http://2130706433/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "file:///etc/passwd"}, "/webhook_url", "url_not_allowed"),
        (
            {"webhook_url": "https://x.test/", "webhook_events": ["exploded"]},
            "/webhook_events/0",
            "invalid_request",
        ),
        ({"webhook_url": "https://x.test/", "webhook_events": []}, "/webhook_events", "invalid_request"),
        ({"webhook_events": ["started"]}, "/webhook_events", "invalid_request"),
    ],
)
def test_the_api_refuses_bad_webhooks_naming_the_field(
    api_client: Any, api_hooks: Settings, acme: ApiTenant, webhook: dict, pointer: str, code: str
) -> None:
    response = _create(api_client, acme, **webhook)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert pointer in [e["pointer"] for e in problem["errors"]]


def test_webhooks_over_the_api(
    api_client: Any,
    api_hooks: Settings,
    acme: ApiTenant,
    globex: ApiTenant,
    receiver: Receiver,
    doorbell: Doorbell,
) -> None:
    receiver.script = [500]
    created = _create(api_client, acme, "run-1", webhook_url=receiver.url)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["webhook_url"] == receiver.url
    assert job["webhook_events"] == ["started", "succeeded", "failed", "canceled"]
    # The webhook is part of what an Idempotency-Key names.
    assert _create(api_client, acme, "run-1", webhook_url=receiver.url).status_code == 200
    changed = _create(api_client, acme, "run-1", webhook_url=receiver.url + "/other")
    assert (changed.status_code, changed.json()["code"]) == (422, "idempotency_key_reused")

    # The tenant reads the secret it verifies with; another tenant has its own.
    secret = api_client.get("/v1/webhook-secret", headers=acme.headers).json()
    assert secret["secret"].startswith("whsec_") and secret["previous_secret_expires_at"] is None
    assert api_client.get("/v1/webhook-secret", headers=globex.headers).json()["secret"] != secret["secret"]

    # A cancel of the queued job is an event the worker never sees: the API's commit rings for it.
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel", headers=acme.headers).status_code == 200
    assert doorbell.drain() == ["pending", "succeeded"]
    assert [r.json["type"] for r in receiver.requests] == ["job.canceled"] * 2
    assert all(verify(secret["secret"], r.headers, r.body) for r in receiver.requests)

    listed = api_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=acme.headers).json()
    (delivery,) = listed["data"]
    assert delivery["id"] == receiver.requests[0].headers["webhook-id"]
    assert (delivery["type"], delivery["status"], delivery["attempts"]) == ("job.canceled", "succeeded", 2)
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 204]
    hidden = api_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=globex.headers)
    assert hidden.status_code == 404

    rotated = api_client.post("/v1/webhook-secret/rotate", headers=acme.headers).json()
    assert rotated["secret"] != secret["secret"] and rotated["previous_secret_expires_at"] is not None
    assert api_client.get("/v1/webhook-secret", headers=acme.headers).json()["secret"] == rotated["secret"]
