"""`POST /v1/jobs` for hyper_lora and for personalisation (`init_from`): everything a worker would
trip over is answered before queueing, as a problem+json naming the field."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from core.config import Settings
from core.db import session_scope
from core.ids import new_id
from core.models import Artifact, Job
from tests.db_fixtures import ApiTenant, SentTasks, insert_dataset
from tests.test_api_contract import assert_problem


def hyper_artifact(settings: Settings, tenant_id: str, **params: Any) -> str:
    """An artifact row as a finished hyper_lora job leaves it (the API reads only the row)."""
    artifact_id = new_id("art")
    manifest = {
        "method": "hyper_lora",
        "base_model": {"id": "tiny-sd", "family": "sd"},
        "params": {"method": "hyper_lora", "rank": 4, "alpha": None, "targets": "attention", **params},
    }
    with session_scope(settings.database_url) as session:
        session.add(
            Artifact(
                id=artifact_id,
                tenant_id=tenant_id,
                method="hyper_lora",
                base_model="tiny-sd",
                storage_prefix=f"tenants/{tenant_id}/jobs/x/attempt-1",
                manifest=manifest,
            )
        )
    return artifact_id


def upload_image(client: TestClient, tenant: ApiTenant) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (230, 30, 230), dtype=np.uint8)).save(buffer, format="PNG")
    response = client.post(
        "/v1/images", files={"file": ("ref.png", buffer.getvalue(), "image/png")}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def personalise(hyper: str, images: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "base_model": "tiny-sd",
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 0},
        "init_from": {"hyper_lora": hyper, "images": images},
        **extra,
    }


def test_personalisation_job_needs_no_dataset_and_may_train_zero_steps(
    api_client: TestClient, acme: ApiTenant, api_settings: Settings, sent_tasks: SentTasks
) -> None:
    hyper = hyper_artifact(api_settings, acme.tenant_id)
    image = upload_image(api_client, acme)
    response = api_client.post("/v1/jobs", json=personalise(hyper, [image, image]), headers=acme.headers)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["method"] == "lora" and job["dataset_id"] is None
    with session_scope(api_settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert row.spec["init_from"] == {"hyper_lora": hyper, "images": [image, image]}
    assert sent_tasks.train == [job["id"]]


def test_personalisation_refuses_what_the_worker_could_not_run(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant, api_settings: Settings, sent_tasks: SentTasks
) -> None:
    hyper = hyper_artifact(api_settings, acme.tenant_id)
    image = upload_image(api_client, acme)

    def post(body: dict[str, Any]) -> Any:
        return api_client.post("/v1/jobs", json=body, headers=acme.headers)

    problem = assert_problem(
        post(personalise(hyper, [image], params={"method": "lora", "rank": 8})), 422, "artifact_incompatible"
    )
    assert [e["pointer"] for e in problem["errors"]] == ["/init_from/hyper_lora"] * 2  # rank and alpha
    assert "params.rank must be 4" in problem["detail"]
    lora = hyper_artifact(api_settings, acme.tenant_id)
    with session_scope(api_settings.database_url) as session:
        row = session.get(Artifact, lora)
        assert row is not None
        row.method = "lora"
    assert_problem(post(personalise(lora, [image])), 422, "artifact_incompatible")
    # Another tenant's artifact or image answers as one that does not exist.
    theirs = hyper_artifact(api_settings, globex.tenant_id)
    assert_problem(post(personalise(theirs, [image])), 404, "artifact_not_found")
    their_image = upload_image(api_client, globex)
    assert_problem(post(personalise(hyper, [image, their_image])), 404, "image_not_found")

    cases = [
        (personalise(hyper, [image], params={"method": "hyper_lora"}), "/init_from"),
        (personalise(hyper, [image] * 6), "/init_from/images"),
        ({**personalise(hyper, [image]), "init_from": None}, "/dataset_id"),
        (
            {**personalise(hyper, [image]), "init_from": None, "dataset_id": acme.dataset_id},
            "/training/max_steps",
        ),
    ]
    for body, pointer in cases:
        problem = assert_problem(post(body), 422, "invalid_request")
        assert [e["pointer"] for e in problem["errors"]] == [pointer], problem["errors"]
    assert sent_tasks.train == []


def test_hyper_lora_needs_one_folder_per_concept(
    api_client: TestClient, acme: ApiTenant, api_settings: Settings, sent_tasks: SentTasks
) -> None:
    body = {"base_model": "tiny-sd", "params": {"method": "hyper_lora"}, "training": {"max_steps": 10}}
    problem = assert_problem(
        api_client.post("/v1/jobs", json={**body, "dataset_id": acme.dataset_id}, headers=acme.headers),
        422,
        "dataset_too_small",  # 5 images; 4 concepts of 2 need 8
    )
    assert "8 concept images" in problem["detail"]
    with session_scope(api_settings.database_url) as session:
        flat = insert_dataset(session, acme.tenant_id, image_count=9)
        few = insert_dataset(session, acme.tenant_id, names=[f"c{i % 3}/{i}.png" for i in range(9)])
        good = insert_dataset(session, acme.tenant_id, names=[f"c{i % 4}/{i}.png" for i in range(8)])
    problem = assert_problem(
        api_client.post("/v1/jobs", json={**body, "dataset_id": flat}, headers=acme.headers),
        422,
        "dataset_unsuitable",
    )
    assert "9 image(s) are not in a concept folder" in problem["detail"]
    problem = assert_problem(
        api_client.post("/v1/jobs", json={**body, "dataset_id": few}, headers=acme.headers),
        422,
        "dataset_unsuitable",
    )
    assert "3 concept folder(s); at least 4 are needed" in problem["detail"]
    assert sent_tasks.train == []
    response = api_client.post("/v1/jobs", json={**body, "dataset_id": good}, headers=acme.headers)
    assert response.status_code == 201, response.text
