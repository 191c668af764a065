"""The HTTP contract of design.md §5, in-process on SQLite: auth, tenancy, idempotency, validation,
pagination, cancel, catalog, and RFC 9457 problem+json on every error.

The broker is replaced by a recorder (`sent_tasks`); the real queue runs in the end-to-end tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from core.config import Settings
from core.db import session_scope
from core.jobs import creation
from core.jobs import states as jobs
from core.models import DatasetStatus, Job, JobStatus
from core.storage.factory import make_storage
from core.storage.local import LocalStorage
from tests.db_fixtures import ApiTenant, SentTasks, make_api_tenant, succeed_with_artifact

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
WEIGHTS = "pytorch_lora_weights.safetensors"


def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem with a stable code; returns the body for further checks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body.keys() >= PROBLEM_FIELDS, body
    assert (body["status"], body["code"]) == (status, code), body
    assert body["type"].endswith(f"/{code}")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def job_body(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 10},
    }
    body.update(overrides)
    return body


def create_job(client: TestClient, tenant: ApiTenant, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=job_body(tenant.dataset_id, **overrides), headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()


# --- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "unauthorized"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "unauthorized"),
        ({"Authorization": "Bearer "}, "unauthorized"),
        ({"Authorization": "Bearer atl_not-a-real-key"}, "invalid_api_key"),
    ],
    ids=["no header", "basic auth", "empty bearer", "unknown key"],
)
def test_requests_without_a_valid_key_get_401(
    api_client: TestClient, acme: ApiTenant, headers: dict[str, str], code: str
) -> None:
    for method, path in [
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/datasets/{acme.dataset_id}"),
        ("POST", "/v1/jobs"),
    ]:
        # An invalid body must not be validated first: strangers learn nothing about the API.
        response = api_client.request(method, path, headers=headers, json={"bogus": 1})
        assert_problem(response, 401, code)
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_valid_key_is_accepted(api_client: TestClient, acme: ApiTenant) -> None:
    response = api_client.get("/v1/jobs", headers=acme.headers)
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [], "has_more": False}


# --- tenancy: another tenant's id answers exactly like a missing one -------------------------------


def _artifact_for(settings: Settings, job_id: str) -> str:
    manifest = {"primary": WEIGHTS, "files": [{"name": WEIGHTS}]}
    return succeed_with_artifact(
        settings.database_url, job_id, prefix=f"jobs/{job_id}/attempt-1", manifest=manifest
    )


def _masked(response: Response, ident: str) -> tuple[int, str, str]:
    return response.status_code, response.headers["content-type"], response.text.replace(ident, "<id>")


CROSS_TENANT_REQUESTS = [
    ("GET", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/jobs/{job}/samples"),
    ("GET", "/v1/datasets/{dataset}"),
    ("DELETE", "/v1/datasets/{dataset}"),
    ("GET", "/v1/artifacts/{artifact}"),
    ("GET", "/v1/artifacts/{artifact}/download"),
]


@pytest.mark.parametrize(("method", "template"), CROSS_TENANT_REQUESTS)
def test_other_tenants_ids_answer_404_like_missing_ids(
    api_client: TestClient,
    api_settings: Settings,
    acme: ApiTenant,
    globex: ApiTenant,
    method: str,
    template: str,
) -> None:
    job_id = create_job(api_client, acme)["id"]
    owned = {"job": job_id, "dataset": acme.dataset_id, "artifact": _artifact_for(api_settings, job_id)}
    missing = {kind: ident[:-1] + ("1" if ident.endswith("0") else "0") for kind, ident in owned.items()}
    kind = template.split("{")[1].split("}")[0]

    foreign = api_client.request(method, template.format(**owned), headers=globex.headers)
    absent = api_client.request(method, template.format(**missing), headers=globex.headers)

    assert_problem(foreign, 404, f"{kind}_not_found")
    assert _masked(foreign, owned[kind]) == _masked(absent, missing[kind])
    # The owner still sees it, and the stranger's request changed nothing.
    assert api_client.get(f"/v1/jobs/{job_id}", headers=acme.headers).json()["status"] == "succeeded"
    dataset = api_client.get(f"/v1/datasets/{acme.dataset_id}", headers=acme.headers).json()
    assert dataset["status"] == "ready"


def test_another_tenants_dataset_cannot_be_trained_on(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant
) -> None:
    response = api_client.post("/v1/jobs", json=job_body(acme.dataset_id), headers=globex.headers)
    assert_problem(response, 404, "dataset_not_found")


def test_lists_show_only_the_tenants_own_rows(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant
) -> None:
    mine = create_job(api_client, acme)["id"]
    create_job(api_client, globex)
    jobs_listed = api_client.get("/v1/jobs", headers=acme.headers).json()["data"]
    assert [j["id"] for j in jobs_listed] == [mine]
    datasets = api_client.get("/v1/datasets", headers=acme.headers).json()["data"]
    assert [d["id"] for d in datasets] == [acme.dataset_id]


# --- creating jobs --------------------------------------------------------------------------------


def test_create_job_queues_it_and_rings_the_broker(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, sent_tasks: SentTasks
) -> None:
    job = create_job(api_client, acme)
    assert (job["object"], job["status"], job["attempt"]) == ("job", "queued", 0)
    assert (job["method"], job["base_model"], job["dataset_id"]) == ("lora", "tiny-sd", acme.dataset_id)
    assert job["params"]["rank"] == 4 and job["training"]["max_steps"] == 10
    assert job["progress"]["total"] == 10
    assert sent_tasks.train == [job["id"]]
    with session_scope(api_settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.dispatched_at is not None


def test_create_job_survives_an_unreachable_broker(
    api_client: TestClient,
    api_settings: Settings,
    acme: ApiTenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import api.routes.jobs

    def broker_down(job_id: str) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(api.routes.jobs, "send_train", broker_down)
    job = create_job(api_client, acme)
    # The row is the truth: it stays queued and undispatched, for the beat to re-send.
    with session_scope(api_settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert (row.status, row.dispatched_at) == (JobStatus.queued, None)


def test_idempotency_key(api_client: TestClient, acme: ApiTenant, sent_tasks: SentTasks) -> None:
    headers = {**acme.headers, "Idempotency-Key": "order-42"}
    first = api_client.post("/v1/jobs", json=job_body(acme.dataset_id), headers=headers)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers

    replay = api_client.post("/v1/jobs", json=job_body(acme.dataset_id), headers=headers)
    assert replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert sent_tasks.train == [first.json()["id"]]  # a replay never starts a second GPU job

    changed = job_body(acme.dataset_id, training={"max_steps": 11})
    conflict = api_client.post("/v1/jobs", json=changed, headers=headers)
    body = assert_problem(conflict, 422, "idempotency_key_reused")
    assert first.json()["id"] in body["detail"]

    listed = api_client.get("/v1/jobs", headers=acme.headers).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]

    too_long = api_client.post(
        "/v1/jobs", json=job_body(acme.dataset_id), headers={**acme.headers, "Idempotency-Key": "k" * 201}
    )
    problem = assert_problem(too_long, 422, "invalid_request")
    assert [e["location"] for e in problem["errors"]] == ["header"]


def test_idempotency_keys_are_per_tenant(api_client: TestClient, acme: ApiTenant, globex: ApiTenant) -> None:
    a = api_client.post(
        "/v1/jobs", json=job_body(acme.dataset_id), headers={**acme.headers, "Idempotency-Key": "k"}
    )
    b = api_client.post(
        "/v1/jobs", json=job_body(globex.dataset_id), headers={**globex.headers, "Idempotency-Key": "k"}
    )
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("steps 1e9", {"training": {"max_steps": 1e9}}, "/training/max_steps"),
    ("steps zero", {"training": {"max_steps": 0}}, "/training/max_steps"),
    ("lr string NaN", {"training": {"learning_rate": "NaN"}}, "/training/learning_rate"),
    ("lr negative", {"training": {"learning_rate": -1e-4}}, "/training/learning_rate"),
    ("resolution 16384", {"training": {"resolution": 16384}}, "/training/resolution"),
    ("resolution not /8", {"training": {"resolution": 500}}, "/training/resolution"),
    ("rank 4096", {"params": {"method": "lora", "rank": 4096}}, "/params/rank"),
    ("unknown top-level field", {"colour": "blue"}, "/colour"),
    ("unknown training field", {"training": {"learnig_rate": 1e-4}}, "/training/learnig_rate"),
    ("unknown params field", {"params": {"method": "lora", "rnk": 8}}, "/params/rnk"),
    ("unknown method", {"params": {"method": "telepathy"}}, "/params/method"),
    ("no method", {"params": {"rank": 4}}, "/params/method"),
    ("sample prompt too long", {"training": {"sample_prompts": ["x" * 501]}}, "/training/sample_prompts/0"),
    ("field name with / and ~", {"training": {"a/b~c": 1}}, "/training/a~1b~0c"),
]


@pytest.mark.parametrize(("body", "pointer"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_params_name_the_json_pointer(
    api_client: TestClient, acme: ApiTenant, sent_tasks: SentTasks, body: dict[str, Any], pointer: str
) -> None:
    response = api_client.post("/v1/jobs", json=job_body(acme.dataset_id, **body), headers=acme.headers)
    problem = assert_problem(response, 422, "invalid_request")
    assert [e["pointer"] for e in problem["errors"]] == [pointer], problem["errors"]
    assert all(e["location"] == "body" and e["message"] for e in problem["errors"])
    assert pointer in problem["detail"]
    assert sent_tasks.train == []


def test_a_raw_nan_literal_is_refused(api_client: TestClient, acme: ApiTenant) -> None:
    # Python's json parser accepts the non-standard NaN token, so it can reach the model.
    raw = json.dumps(job_body(acme.dataset_id, training={"learning_rate": math.nan})).encode()
    assert b"NaN" in raw
    response = api_client.post(
        "/v1/jobs", content=raw, headers={**acme.headers, "Content-Type": "application/json"}
    )
    problem = assert_problem(response, 422, "invalid_request")
    assert [e["pointer"] for e in problem["errors"]] == ["/training/learning_rate"]


def test_malformed_json_is_a_problem_for_the_whole_document(api_client: TestClient, acme: ApiTenant) -> None:
    response = api_client.post(
        "/v1/jobs", content=b"{not json", headers={**acme.headers, "Content-Type": "application/json"}
    )
    problem = assert_problem(response, 422, "invalid_request")
    assert [(e["pointer"], e["type"]) for e in problem["errors"]] == [("", "json_invalid")]


def test_base_model_must_be_allowed(api_client: TestClient, acme: ApiTenant, sent_tasks: SentTasks) -> None:
    body = job_body(acme.dataset_id, base_model="runwayml/stable-diffusion-v1-5")
    response = api_client.post("/v1/jobs", json=body, headers=acme.headers)
    assert_problem(response, 422, "base_model_not_allowed")
    assert sent_tasks.train == []


@pytest.mark.parametrize(
    ("status", "image_count", "code"),
    [
        (DatasetStatus.validating, 5, "dataset_not_ready"),
        (DatasetStatus.invalid, 5, "dataset_not_ready"),
        (DatasetStatus.ready, 0, "dataset_too_small"),
    ],
)
def test_dataset_must_be_ready_and_big_enough(
    api_client: TestClient, api_settings: Settings, status: str, image_count: int, code: str
) -> None:
    tenant = make_api_tenant(api_settings, dataset_status=status, image_count=image_count)
    response = api_client.post("/v1/jobs", json=job_body(tenant.dataset_id), headers=tenant.headers)
    body = assert_problem(response, 422, code)
    assert tenant.dataset_id in body["detail"]


# --- listing, cancel, events ----------------------------------------------------------------------


def test_list_jobs_pages_newest_first(api_client: TestClient, acme: ApiTenant) -> None:
    created = [create_job(api_client, acme)["id"] for _ in range(5)]
    newest_first = list(reversed(created))

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        page = api_client.get("/v1/jobs", params=params, headers=acme.headers).json()
        pages += 1
        seen += [j["id"] for j in page["data"]]
        assert page["has_more"] is (len(seen) < 5)
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert (seen, pages) == (newest_first, 3)

    canceled = created[1]
    api_client.post(f"/v1/jobs/{canceled}/cancel", headers=acme.headers)
    by_status = {
        status: [
            j["id"] for j in api_client.get(f"/v1/jobs?status={status}", headers=acme.headers).json()["data"]
        ]
        for status in ("canceled", "queued", "running")
    }
    assert by_status == {
        "canceled": [canceled],
        "queued": [i for i in newest_first if i != canceled],
        "running": [],
    }
    assert_problem(api_client.get("/v1/jobs?status=paused", headers=acme.headers), 422, "invalid_request")
    assert_problem(api_client.get("/v1/jobs?limit=0", headers=acme.headers), 422, "invalid_request")
    assert_problem(api_client.get("/v1/jobs?limit=101", headers=acme.headers), 422, "invalid_request")


def test_cancel_a_queued_job(api_client: TestClient, acme: ApiTenant) -> None:
    job_id = create_job(api_client, acme)["id"]
    canceled = api_client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    assert canceled.status_code == 200
    assert (canceled.json()["status"], canceled.json()["cancel_requested"]) == ("canceled", True)
    assert canceled.json()["finished_at"] is not None

    again = api_client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    body = assert_problem(again, 409, "job_finished")
    assert job_id in body["detail"]


def test_cancel_a_running_job_sets_the_flag(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant
) -> None:
    job_id = create_job(api_client, acme)["id"]
    with session_scope(api_settings.database_url) as session:
        assert jobs.claim(session=session, job_id=job_id, worker_id="w", lease_s=60) == 1
    response = api_client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("running", True)
    with session_scope(api_settings.database_url) as session:
        assert jobs.heartbeat(session=session, job_id=job_id, attempt=1, lease_s=60) is True


def test_events_list_starts_with_created(api_client: TestClient, acme: ApiTenant) -> None:
    job_id = create_job(api_client, acme)["id"]
    response = api_client.get(f"/v1/jobs/{job_id}/events", headers=acme.headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    events = response.json()
    assert events["object"] == "list" and events["has_more"] is False
    assert [(e["type"], e["attempt"]) for e in events["data"]] == [("created", 0)]

    api_client.post(f"/v1/jobs/{job_id}/cancel", headers=acme.headers)
    after = events["data"][0]["id"]
    later = api_client.get(f"/v1/jobs/{job_id}/events?after={after}", headers=acme.headers).json()
    assert [e["type"] for e in later["data"]] == ["canceled"]


def test_artifact_manifest_and_download(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant
) -> None:
    job_id = create_job(api_client, acme)["id"]
    artifact_id = _artifact_for(api_settings, job_id)
    make_storage(api_settings).put_bytes(f"jobs/{job_id}/attempt-1/{WEIGHTS}", b"weights")

    manifest = api_client.get(f"/v1/artifacts/{artifact_id}", headers=acme.headers).json()
    assert (manifest["id"], manifest["job_id"], manifest["method"]) == (artifact_id, job_id, "lora")
    assert api_client.get(f"/v1/jobs/{job_id}", headers=acme.headers).json()["artifact_id"] == artifact_id

    download = api_client.get(f"/v1/artifacts/{artifact_id}/download", headers=acme.headers)
    assert (download.status_code, download.content) == (200, b"weights")
    outside = api_client.get(
        f"/v1/artifacts/{artifact_id}/download", params={"file": "../../atelier.db"}, headers=acme.headers
    )
    assert_problem(outside, 422, "file_not_in_artifact")
    unknown = api_client.get(f"/v1/artifacts/{artifact_id}/download?format=ckpt", headers=acme.headers)
    assert_problem(unknown, 422, "format_not_supported")
    assert "kohya" in unknown.json()["detail"]  # names what a LoRA is offered as
    # This artifact's manifest lists no exports (made before they existed): 409, not a 500.
    a1111 = api_client.get(f"/v1/artifacts/{artifact_id}/download?format=a1111", headers=acme.headers)
    assert_problem(a1111, 409, "export_not_available")


def test_storage_follows_the_settings_object(tmp_path: Path) -> None:
    # Settings come and go between tests; a recycled object id must not hand out another test's folder.
    from api.deps import get_storage

    for i in range(20):
        settings = Settings(home=tmp_path / str(i), database_url="sqlite://")
        storage = get_storage(settings)
        assert isinstance(storage, LocalStorage)
        assert storage.root == settings.storage_root


def test_unexpected_errors_are_problems_that_leak_nothing(
    api_client: TestClient, acme: ApiTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(**_: Any) -> None:
        raise RuntimeError("password=hunter2 at db-internal:5432")

    monkeypatch.setattr(creation, "create_job", explode)
    client = TestClient(api_client.app, raise_server_exceptions=False)
    response = client.post("/v1/jobs", json=job_body(acme.dataset_id), headers=acme.headers)
    assert_problem(response, 500, "internal_error")
    assert "hunter2" not in response.text


# --- catalog and health ---------------------------------------------------------------------------


def test_methods_serve_a_json_schema_for_lora(api_client: TestClient) -> None:
    response = api_client.get("/v1/methods")
    assert response.status_code == 200
    methods = {m["name"]: m for m in response.json()["data"]}
    lora = methods["lora"]
    schema = lora["params"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["rank"]["maximum"] == 256
    assert lora["training"]["properties"]["max_steps"]["maximum"] == 100_000


def test_base_models_list_tiny_sd(api_client: TestClient) -> None:
    response = api_client.get("/v1/base-models")
    assert response.status_code == 200
    assert "tiny-sd" in [m["id"] for m in response.json()["data"]]


def test_healthz(api_client: TestClient) -> None:
    response = api_client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/v1/nowhere", 404, "not_found"), ("DELETE", "/healthz", 405, "method_not_allowed")],
)
def test_framework_errors_are_problems_too(
    api_client: TestClient, method: str, path: str, status: int, code: str
) -> None:
    assert_problem(api_client.request(method, path), status, code)
