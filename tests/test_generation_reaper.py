"""The beat's reaper takes back a dead worker's generation and sends it again; the cancel route
cancels a queued generation at once and flags a running one for its worker. In-process, on SQLite.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.config import Settings
from core.db import session_scope, upgrade
from core.generation import states as generation_states
from tests.db_fixtures import ApiTenant, SentTasks, make_tenant
from tests.generation_fixtures import add_generation, claim_now, expire_lease, fresh_row
from tests.test_api_contract import assert_problem

# --- the beat's reaper ---------------------------------------------------------------------------------


def test_the_beat_requeues_a_dead_workers_generation_and_sends_it_again(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks

    upgrade(api_settings.database_url)
    with session_scope(api_settings.database_url) as session:
        generation_id = add_generation(session, make_tenant(session))
        claim_now(session, generation_id)
        expire_lease(session, generation_id)
    sent: list[str] = []
    monkeypatch.setattr(worker.tasks, "send_generate", sent.append)
    monkeypatch.setattr(worker.tasks, "send_train", lambda job_id: None)

    result = worker.tasks.reap_stale_jobs()

    assert result["requeued_generations"] == [generation_id]
    assert sent == [generation_id] == result["resent_generations"]
    with session_scope(api_settings.database_url) as session:
        row = fresh_row(session, generation_id)
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
        attempt = claim_now(session, generation_id)

    response = api_client.post(f"/v1/generations/{generation_id}/cancel", headers=acme.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["cancel_requested"], body["attempt"]) == ("running", True, 1)
    assert body["started_at"] is not None and body["finished_at"] is None
    with session_scope(api_settings.database_url) as session:
        assert generation_states.heartbeat(
            session=session, generation_id=generation_id, attempt=attempt, lease_s=60
        )
