"""DELETE for datasets, jobs, artifacts, generations and images: every object that came from them
leaves storage, as listed behind our Storage interface (the local store's files; the S3 server's
bucket through a raw boto3 client), while anything a queued or running job or generation needs is
refused with 409, and another tenant's ids answer 404.

Jobs are driven through core.jobs.states and the worker's own JobHooks, which write checkpoints, samples
and class images where a real training run does; one end-to-end test trains for real.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.config import Settings, get_settings, reset_settings
from core.db import session_scope
from core.jobs import states as jobs
from core.jobs.hooks import Heartbeat, JobHooks
from core.models import Generation, Job, JobEvent, JobStatus
from core.storage.artifacts import local_copy
from core.storage.base import Storage
from core.storage.factory import make_storage
from core.storage.keys import job_prefix
from tests.db_fixtures import ApiTenant, SentTasks, make_api_tenant
from tests.s3_server import S3Server
from tests.service_stack import Stack
from tests.test_api_contract import assert_problem, job_body
from tests.test_generation_api import data_uri, png

CACHE_KEY = hashlib.sha256(b"class images of a dog").hexdigest()


@dataclass
class Service:
    client: TestClient
    settings: Settings
    storage: Storage
    objects: Callable[[], set[str]]  # every object in the store, listed without our Storage code

    def tenant(self, name: str) -> ApiTenant:
        return make_api_tenant(self.settings, name)


def _bucket_lister(server: S3Server, bucket: str) -> Callable[[], set[str]]:
    raw = server.client()

    def objects() -> set[str]:
        keys: set[str] = set()
        for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys.update(item["Key"] for item in page.get("Contents", []))
        return keys

    return objects


def _folder_lister(root: Path) -> Callable[[], set[str]]:
    def objects() -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    return objects


@pytest.fixture(params=["local", "s3"])
def service(
    request: pytest.FixtureRequest,
    api_settings: Settings,
    sent_tasks: SentTasks,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Service]:
    """The API in-process on SQLite, storing in the local store or in a bucket of its own on the
    S3 test server; the broker recorded (sent_tasks)."""
    from api.main import create_app

    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        bucket = f"deletion-{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv("ATELIER_STORAGE", "s3")
        monkeypatch.setenv("ATELIER_S3_BUCKET", bucket)
        monkeypatch.setenv("ATELIER_S3_ENDPOINT_URL", server.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        reset_settings()
        settings = get_settings()
        storage = make_storage(settings)  # creates the bucket
        objects = _bucket_lister(server, bucket)
    else:
        settings = api_settings
        storage = make_storage(settings)
        assert settings.storage_root is not None
        objects = _folder_lister(settings.storage_root)
    with TestClient(create_app()) as client:
        yield Service(client, settings, storage, objects)


def deleted(response: Any, object_id: str, kind: str) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"id": object_id, "object": kind, "deleted": True}


def under(keys: set[str], prefix: str) -> set[str]:
    return {key for key in keys if key.startswith(prefix.rstrip("/") + "/")}


def upload_dataset(service: Service, tenant: ApiTenant, count: int = 3) -> str:
    files = [("files", (f"{i}.png", png((16, 16)), "image/png")) for i in range(count)]
    files += [("files", (f"{i}.txt", b"a photo of sks", "text/plain")) for i in range(count)]
    response = service.client.post("/v1/datasets", files=files, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def create_job(service: Service, tenant: ApiTenant, dataset_id: str, **params: Any) -> str:
    body = job_body(dataset_id, params={"method": "lora", "rank": 4, **params})
    response = service.client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def claim(service: Service, job_id: str) -> int:
    with session_scope(service.settings.database_url) as session:
        attempt = jobs.claim(session=session, job_id=job_id, worker_id="test", lease_s=60)
    assert attempt is not None
    return attempt


def finish(
    service: Service,
    job_id: str,
    attempt: int,
    status: JobStatus,
    artifact: jobs.ArtifactRecord | None = None,
) -> str | None:
    with session_scope(service.settings.database_url) as session:
        return jobs.finish(session=session, job_id=job_id, attempt=attempt, status=status, artifact=artifact)


def hooks_for(service: Service, job_id: str, attempt: int, workdir: Path) -> JobHooks:
    """The worker's hooks for a running attempt (the heartbeat thread is never started)."""
    with session_scope(service.settings.database_url) as session:
        job = session.get(Job, job_id)
    assert job is not None
    heartbeat = Heartbeat(settings=service.settings, job_id=job_id, attempt=attempt)
    return JobHooks(
        settings=service.settings,
        storage=service.storage,
        job=job,
        attempt=attempt,
        heartbeat=heartbeat,
        workdir=workdir,
    )


def store_artifact(service: Service, tenant_id: str, job_id: str, attempt: int) -> jobs.ArtifactRecord:
    """Weights and an export under the attempt's prefix, where the worker uploads them."""
    prefix = f"{job_prefix(tenant_id, job_id)}/attempt-{attempt}"
    files = {"pytorch_lora_weights.safetensors": b"weights", "kohya/lora.safetensors": b"export"}
    for name, data in files.items():
        service.storage.put_bytes(f"{prefix}/{name}", data)
    service.storage.put_bytes(f"{prefix}/manifest.json", b"{}")
    manifest = {
        "files": [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()],
        "exports": {"kohya": ["kohya/lora.safetensors"]},
    }
    return jobs.ArtifactRecord(storage_prefix=prefix, manifest=manifest)


def train_fake(service: Service, tenant: ApiTenant, job_id: str, tmp_path: Path) -> jobs.ArtifactRecord:
    """What a DreamBooth-like attempt leaves: two checkpoints (the older one replaced), samples,
    class images in the tenant's cache, and the artifact; the job stays running."""
    attempt = claim(service, job_id)
    hooks = hooks_for(service, job_id, attempt, tmp_path)
    for step in (1, 2):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.bin").write_bytes(b"state")
        hooks.save_checkpoint(step=step, folder=folder)
    hooks.save_samples(step=2, images=[Image.new("RGB", (8, 8))] * 2, prompts=["a", "b"])
    hooks.cached_images(key=CACHE_KEY, count=2, make=lambda count: [Image.new("RGB", (8, 8), "red")] * count)
    return store_artifact(service, tenant.tenant_id, job_id, attempt)


# --- datasets -----------------------------------------------------------------------------------


def test_deleting_a_dataset_removes_its_files_once_no_job_needs_it(service: Service) -> None:
    acme, globex = service.tenant("acme"), service.tenant("globex")
    before = service.objects()
    dataset_id = upload_dataset(service, acme)
    stored = service.objects() - before
    # Three images and the manifest (captions included), all under the dataset's prefix.
    assert len(stored) == 4 and stored == under(stored, f"tenants/{acme.tenant_id}/datasets/{dataset_id}")
    url = f"/v1/datasets/{dataset_id}"

    queued = create_job(service, acme, dataset_id)
    assert_problem(service.client.delete(url, headers=acme.headers), 409, "dataset_in_use")
    attempt = claim(service, queued)
    response = service.client.delete(url, headers=acme.headers)
    assert_problem(response, 409, "dataset_in_use")
    assert queued in response.json()["detail"]
    assert service.objects() - before == stored
    assert service.client.get(url, headers=acme.headers).json()["status"] == "ready"
    assert_problem(service.client.delete(url, headers=globex.headers), 404, "dataset_not_found")

    finish(service, queued, attempt, JobStatus.failed)
    deleted(service.client.delete(url, headers=acme.headers), dataset_id, "dataset")
    assert service.objects() == before
    assert_problem(service.client.get(url, headers=acme.headers), 404, "dataset_not_found")
    assert_problem(service.client.delete(url, headers=acme.headers), 404, "dataset_not_found")
    # The finished job stays, without its dataset; no new job can name it.
    job = service.client.get(f"/v1/jobs/{queued}", headers=acme.headers).json()
    assert job["status"] == "failed" and job["dataset_id"] is None
    body = job_body(dataset_id)
    assert_problem(service.client.post("/v1/jobs", json=body, headers=acme.headers), 404, "dataset_not_found")


# --- jobs and artifacts ---------------------------------------------------------------------------


def test_deleting_a_job_keeps_its_artifact_and_deleting_that_leaves_nothing(
    service: Service, tmp_path: Path
) -> None:
    acme, globex = service.tenant("acme"), service.tenant("globex")
    before = service.objects()
    dataset_id = upload_dataset(service, acme)
    first = create_job(service, acme, dataset_id)
    record = train_fake(service, acme, first, tmp_path / "first")
    prefix = job_prefix(acme.tenant_id, first)
    made = service.objects()
    assert {key.removeprefix(prefix + "/").split("/")[0] for key in under(made, prefix)} == {
        "checkpoints",
        "samples",
        "attempt-1",
    }
    assert len(under(made, f"{prefix}/checkpoints")) == 1  # the newest checkpoint only
    cache = f"tenants/{acme.tenant_id}/cache/images/{CACHE_KEY}"
    assert len(under(made, cache)) == 3  # two images and index.json
    url = f"/v1/jobs/{first}"
    assert_problem(service.client.delete(url, headers=acme.headers), 409, "job_active")

    artifact_id = finish(service, first, 1, JobStatus.succeeded, artifact=record)
    # A second job reused the class images, then failed.
    second = create_job(service, acme, dataset_id)
    attempt = claim(service, second)
    hooks_for(service, second, attempt, tmp_path).cached_images(key=CACHE_KEY, count=2, make=None)
    finish(service, second, attempt, JobStatus.failed)

    assert_problem(service.client.delete(url, headers=globex.headers), 404, "job_not_found")
    deleted(service.client.delete(url, headers=acme.headers), first, "job")
    left = service.objects()
    assert under(left, prefix) == under(made, record.storage_prefix)  # the artifact's files only
    assert under(left, cache) == under(made, cache)  # still used by the second job
    assert_problem(service.client.get(url, headers=acme.headers), 404, "job_not_found")
    with session_scope(service.settings.database_url) as session:
        assert session.query(JobEvent).filter(JobEvent.job_id == first).count() == 0
    artifact_url = f"/v1/artifacts/{artifact_id}"
    artifact = service.client.get(artifact_url, headers=acme.headers).json()
    assert artifact["job_id"] is None

    deleted(service.client.delete(f"/v1/jobs/{second}", headers=acme.headers), second, "job")
    assert not under(service.objects(), cache)  # no job of the tenant uses them any more

    assert_problem(service.client.delete(artifact_url, headers=globex.headers), 404, "artifact_not_found")
    deleted(service.client.delete(artifact_url, headers=acme.headers), artifact_id, "artifact")
    assert_problem(service.client.get(artifact_url, headers=acme.headers), 404, "artifact_not_found")
    download = service.client.get(f"{artifact_url}/download", headers=acme.headers)
    assert_problem(download, 404, "artifact_not_found")
    deleted(service.client.delete(f"/v1/datasets/{dataset_id}", headers=acme.headers), dataset_id, "dataset")
    assert service.objects() == before


def test_deleting_an_artifact_first_leaves_its_job_without_one(service: Service) -> None:
    """The job stays (artifact_id null) and can still be deleted; other jobs are untouched."""
    acme = service.tenant("acme")
    dataset_id = upload_dataset(service, acme)
    job_id, other = create_job(service, acme, dataset_id), create_job(service, acme, dataset_id)
    artifact_id = finish(
        service,
        job_id,
        claim(service, job_id),
        JobStatus.succeeded,
        artifact=store_artifact(service, acme.tenant_id, job_id, 1),
    )
    before_delete = service.objects()
    deleted(
        service.client.delete(f"/v1/artifacts/{artifact_id}", headers=acme.headers), artifact_id, "artifact"
    )
    assert service.objects() == before_delete - under(before_delete, job_prefix(acme.tenant_id, job_id))
    job = service.client.get(f"/v1/jobs/{job_id}", headers=acme.headers).json()
    assert job["status"] == "succeeded" and job["artifact_id"] is None
    assert service.client.get(f"/v1/jobs/{other}", headers=acme.headers).json()["status"] == "queued"
    assert_problem(service.client.delete(f"/v1/jobs/{other}", headers=acme.headers), 409, "job_active")
    deleted(service.client.delete(f"/v1/jobs/{job_id}", headers=acme.headers), job_id, "job")


# --- generations and images -----------------------------------------------------------------------


def finish_generation(service: Service, generation_id: str, tenant: ApiTenant) -> None:
    """The generate worker's part: PNGs under the generation's prefix, the row succeeded."""
    keys = [f"tenants/{tenant.tenant_id}/generations/{generation_id}/{i}.png" for i in range(2)]
    for key in keys:
        service.storage.put_bytes(key, png())
    with session_scope(service.settings.database_url) as session:
        row = session.get(Generation, generation_id)
        assert row is not None
        row.status, row.image_keys = JobStatus.succeeded, keys


def settings_cache(service: Service) -> Path:
    assert service.settings.model_cache is not None
    return service.settings.model_cache


def make_artifact(service: Service, tenant: ApiTenant, dataset_id: str, method: str) -> str:
    body = job_body(dataset_id, params={"method": method})
    response = service.client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    attempt = claim(service, job_id)
    artifact_id = finish(
        service,
        job_id,
        attempt,
        JobStatus.succeeded,
        store_artifact(service, tenant.tenant_id, job_id, attempt),
    )
    assert artifact_id is not None
    return artifact_id


def test_deleting_generations_and_images_and_what_they_use(service: Service) -> None:
    acme, globex = service.tenant("acme"), service.tenant("globex")
    empty = service.objects()
    lora = make_artifact(service, acme, acme.dataset_id, "lora")
    adapter = make_artifact(service, acme, acme.dataset_id, "ip_adapter")
    uploaded = service.client.post(
        "/v1/images", files={"file": ("ref.png", png(), "image/png")}, headers=acme.headers
    ).json()["id"]
    before = service.objects()

    # One generation with an inline reference image (stored for it), one with the uploaded image.
    inline = {"artifact_id": adapter, "image": data_uri(png(color=(1, 2, 3))), "scale": 0.5}
    request = {"base_model": "tiny-sd", "prompt": "x", "steps": 2, "loras": [{"artifact_id": lora}]}
    first = service.client.post(
        "/v1/generations", json={**request, "ip_adapter": inline}, headers=acme.headers
    )
    assert first.status_code == 201, first.text
    first_id = first.json()["id"]
    reuse = {"artifact_id": adapter, "image": uploaded, "scale": 0.5}
    second = service.client.post(
        "/v1/generations", json={**request, "ip_adapter": reuse}, headers=acme.headers
    )
    second_id = second.json()["id"]
    stored_input = service.objects() - before
    assert len(stored_input) == 1 and stored_input == under(stored_input, f"tenants/{acme.tenant_id}/images")

    # Queued: the generations, their artifacts and the uploaded image are needed.
    for path, code in [
        (f"/v1/generations/{first_id}", "generation_active"),
        (f"/v1/artifacts/{lora}", "artifact_in_use"),
        (f"/v1/artifacts/{adapter}", "artifact_in_use"),
        (f"/v1/images/{uploaded}", "image_in_use"),
    ]:
        assert_problem(service.client.delete(path, headers=acme.headers), 409, code)
        assert_problem(
            service.client.delete(path, headers=globex.headers), 404, path.split("/")[2][:-1] + "_not_found"
        )

    finish_generation(service, first_id, acme)
    finish_generation(service, second_id, acme)
    made = service.objects()
    url = f"/v1/generations/{first_id}"
    deleted(service.client.delete(url, headers=acme.headers), first_id, "generation")
    assert (
        service.objects()
        == made - under(made, f"tenants/{acme.tenant_id}/generations/{first_id}") - stored_input
    )
    assert_problem(service.client.get(url, headers=acme.headers), 404, "generation_not_found")
    assert_problem(service.client.delete(url, headers=acme.headers), 404, "generation_not_found")

    # The uploaded image is the tenant's own: it stays with the generation that used it, and goes
    # when deleted itself.
    deleted(
        service.client.delete(f"/v1/generations/{second_id}", headers=acme.headers), second_id, "generation"
    )
    deleted(service.client.delete(f"/v1/images/{uploaded}", headers=acme.headers), uploaded, "image")
    assert_problem(service.client.get(f"/v1/images/{uploaded}", headers=acme.headers), 404, "image_not_found")
    # The generate worker's copy of the weights, shared by both artifacts (the same files), goes
    # with the last of them.
    manifest = service.client.get(f"/v1/artifacts/{lora}", headers=acme.headers).json()["manifest"]
    copy = local_copy(settings_cache(service), lora, manifest)
    assert copy == local_copy(settings_cache(service), adapter, manifest)
    copy.mkdir(parents=True)
    (copy / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    deleted(service.client.delete(f"/v1/artifacts/{lora}", headers=acme.headers), lora, "artifact")
    assert copy.is_dir()
    deleted(service.client.delete(f"/v1/artifacts/{adapter}", headers=acme.headers), adapter, "artifact")
    assert not copy.exists()
    assert service.objects() == empty


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_job_deleted_with_the_cli_leaves_an_empty_store(
    embedded_stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`atelier serve` with its embedded worker trains tiny-sd for two steps (a checkpoint and
    samples at each); `atelier jobs|artifacts|datasets delete` then leave no file in the store."""
    from cli.demo import PROMPT, make_dataset_zip
    from cli.main import main

    embedded_stack.start_api(with_worker=True)
    client = embedded_stack.client()
    store = embedded_stack.home / "storage"
    dataset_id = client.upload_dataset([make_dataset_zip(tmp_path / "ds.zip", count=2)])["id"]
    body = {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4},
        "training": {
            "max_steps": 2,
            "batch_size": 1,
            "checkpoint_every": 1,
            "sample_every": 1,
            "sample_prompts": [PROMPT],
        },
    }
    job = client.wait(client.create_job(body)["id"], timeout_s=600)
    assert job["status"] == "succeeded", (job["error"], embedded_stack.log("api"))
    kinds = {p.relative_to(store).parts[4] for p in store.rglob("*") if "jobs" in p.parts and p.is_file()}
    assert kinds == {"checkpoints", "samples", "attempt-1"}

    connection = ["--url", embedded_stack.base_url, "--api-key", client.http.headers["Authorization"][7:]]

    def atelier(*argv: str) -> int:
        capsys.readouterr()
        code = main([*connection, *argv])
        assert "Traceback" not in capsys.readouterr().err
        return code

    assert atelier("datasets", "delete", dataset_id) == 0  # the job has finished: allowed
    assert atelier("jobs", "delete", job["id"]) == 0
    assert atelier("artifacts", "delete", job["artifact_id"]) == 0
    assert atelier("jobs", "show", job["id"]) == 1  # 404
    assert [p for p in store.rglob("*") if p.is_file()] == []
