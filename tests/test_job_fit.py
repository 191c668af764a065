"""Fit before queueing: POST /v1/jobs plans a job's accelerator memory against the training workers,
refuses what fits none (422 job_does_not_fit), fits it with training.fit "auto" (every change
recorded), answers dry runs; training workers announce their device; the API knows the published
hub bases' architectures without downloading anything.

The planner's numbers are opaque here (they are being calibrated): every check is a relation (over
or under a worker's memory, changes that keep the effective batch), never a byte count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.bases.allow_list import architecture_for, describe_base
from core.bases.architectures import KNOWN
from core.config import Settings, get_settings, reset_settings
from core.db import session_scope
from core.jobs import workers
from core.jobs.fitting import plan_job, training_capacity
from core.jobs.workers import DeviceInfo
from core.models import Job
from core.spec.job import JobSpec
from core.training.memory import GIB
from tests.db_fixtures import ApiTenant, SentTasks, lora_spec, make_api_tenant
from tests.test_api_contract import assert_problem
from worker.announce import Announcer, detect

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
BASES = {
    "tiny-sd": "builtin:tiny-sd",
    "sdxl-base": f"hf:{SDXL_REPO}",
    "sd15": "hf:runwayml/stable-diffusion-v1-5",
    "juggernaut-xl": "hf:RunDiffusion/Juggernaut-XL",  # a fine-tune, declared below
    "private": "storage:bases/private",  # an uploaded folder the API cannot open
}
DECLARED = {"juggernaut-xl": "sdxl"}
GPU_24 = DeviceInfo("cuda", "24 GiB card", 24 * GIB, bitsandbytes=False)


@pytest.fixture
def fit_settings(api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ATELIER_BASE_MODELS", json.dumps(BASES))
    monkeypatch.setenv("ATELIER_BASE_ARCHITECTURES", json.dumps(DECLARED))
    monkeypatch.setenv("ATELIER_TRAIN_WORKER_MEMORY_GIB", "24")
    reset_settings()
    return get_settings()


@pytest.fixture
def client(fit_settings: Settings, sent_tasks: SentTasks) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def acme(client: TestClient, fit_settings: Settings) -> ApiTenant:
    return make_api_tenant(fit_settings, "acme")


def dreambooth_sdxl(dataset_id: str, **training: Any) -> dict[str, Any]:
    """The issue's job: SDXL DreamBooth at 1024 px, batch 8, AdamW's fp32 moments."""
    return {
        "base_model": "sdxl-base",
        "dataset_id": dataset_id,
        "params": {"method": "dreambooth", "instance_prompt": "a photo of sks dog", "class_prompt": "a dog"},
        "training": {"resolution": 1024, "batch_size": 8, "optimizer": "adamw", **training},
    }


def post(client: TestClient, tenant: ApiTenant, body: dict[str, Any], **params: Any) -> Any:
    return client.post("/v1/jobs", json=body, headers=tenant.headers, params=params)


def announce(settings: Settings, worker_id: str, device: DeviceInfo) -> None:
    with session_scope(settings.database_url) as session:
        workers.announce(session=session, worker_id=worker_id, hostname="h", queues="train", device=device)


# --- the API ------------------------------------------------------------------------------------


def test_sdxl_dreambooth_that_fits_no_worker_is_refused_with_what_would_fit(
    client: TestClient, acme: ApiTenant, sent_tasks: SentTasks
) -> None:
    problem = assert_problem(post(client, acme, dreambooth_sdxl(acme.dataset_id)), 422, "job_does_not_fit")
    assert problem["capacity_bytes"] == 24 * GIB
    assert problem["estimate"]["peak_bytes"] + problem["reserve_bytes"] > 24 * GIB
    fields = [c["field"] for c in problem["suggested_changes"]]
    assert fields[0] == "training.gradient_checkpointing"
    assert problem["suggested_changes"][-1]["peak_bytes_after"] + problem["reserve_bytes"] <= 24 * GIB
    # The detail names the estimate, the largest worker and the way out.
    gib = f"{problem['estimate']['peak_bytes'] / GIB:.1f} GiB"  # as the message rounds it: once
    assert gib in problem["detail"] and "24.0 GiB" in problem["detail"]
    assert 'training.fit "auto"' in problem["detail"]
    assert client.get("/v1/jobs", headers=acme.headers).json()["data"] == []
    assert sent_tasks.train == []


def test_fit_auto_accepts_it_with_every_change_recorded(
    client: TestClient, acme: ApiTenant, sent_tasks: SentTasks
) -> None:
    refused = post(client, acme, dreambooth_sdxl(acme.dataset_id)).json()
    response = post(client, acme, dreambooth_sdxl(acme.dataset_id, fit="auto"))
    assert response.status_code == 201, response.text
    job = client.get(f"/v1/jobs/{response.json()['id']}", headers=acme.headers).json()
    memory, training = job["memory"], job["training"]
    assert memory["fits"] is True and memory["fit"] == "auto" and memory["architecture"] == "sdxl"
    assert memory["changes"] == refused["suggested_changes"]
    fields = [c["field"] for c in memory["changes"]]
    assert fields[:2] == ["training.gradient_checkpointing", "training.optimizer"]
    assert {"training.batch_size", "training.gradient_accumulation_steps"} <= set(fields)
    # The job trains what was planned: the same 8 images per optimizer step, less memory.
    assert training["gradient_checkpointing"] is True
    assert training["optimizer"] in ("adamw_8bit", "adafactor")
    assert training["batch_size"] < 8
    assert training["batch_size"] * training["gradient_accumulation_steps"] == 8
    assert memory["estimate"]["peak_bytes"] + memory["reserve_bytes"] <= memory["capacity_bytes"]
    for change in memory["changes"]:
        assert training[change["field"].removeprefix("training.")] == change["to"]
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=acme.headers).json()["data"]
    assert [e["type"] for e in events] == ["created", "fitted"]
    assert events[1]["data"]["changes"] == memory["changes"]
    assert sent_tasks.train == [job["id"]]


def test_a_replayed_fitted_create_matches_the_request_as_sent(client: TestClient, acme: ApiTenant) -> None:
    body = dreambooth_sdxl(acme.dataset_id, fit="auto")
    headers = {**acme.headers, "Idempotency-Key": "fit-1"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["training"]["batch_size"] < 8


def test_a_job_that_nothing_makes_fit_is_refused_even_with_fit_auto(
    client: TestClient, acme: ApiTenant
) -> None:
    # Full fp32 weights and gradients of SDXL's UNet and both text encoders outgrow 24 GiB alone.
    body = dreambooth_sdxl(acme.dataset_id, fit="auto", batch_size=1)
    body["params"]["train_text_encoder"] = True
    problem = assert_problem(post(client, acme, body), 422, "job_does_not_fit")
    assert problem["suggested_changes"] == []
    assert "more memory" in problem["detail"]


def test_dry_run_answers_the_same_question_without_creating_a_job(
    client: TestClient, acme: ApiTenant, sent_tasks: SentTasks
) -> None:
    refused = post(client, acme, dreambooth_sdxl(acme.dataset_id)).json()
    plan = post(client, acme, dreambooth_sdxl(acme.dataset_id), dry_run="true")
    assert plan.status_code == 200, plan.text
    off = plan.json()
    assert (off["object"], off["fits"]) == ("job_plan", False)
    assert off["suggested_changes"] == refused["suggested_changes"]
    assert off["detail"] == refused["detail"]
    assert off["memory"]["estimate"] == refused["estimate"]
    assert off["spec"]["training"]["batch_size"] == 8

    auto = post(client, acme, dreambooth_sdxl(acme.dataset_id, fit="auto"), dry_run="true").json()
    assert auto["fits"] is True and auto["suggested_changes"] == [] and auto["detail"] is None
    assert auto["memory"]["changes"] == refused["suggested_changes"]
    trained = auto["spec"]["training"]
    assert trained["batch_size"] * trained["gradient_accumulation_steps"] == 8

    assert client.get("/v1/jobs", headers=acme.headers).json()["data"] == []
    assert sent_tasks.train == []
    job = post(client, acme, dreambooth_sdxl(acme.dataset_id, fit="auto")).json()
    assert job["memory"] == auto["memory"] and job["training"] == trained


def test_dry_run_still_validates_the_inputs(client: TestClient, acme: ApiTenant) -> None:
    body = dreambooth_sdxl(acme.dataset_id) | {"base_model": "sd-turbo"}
    assert_problem(post(client, acme, body, dry_run="true"), 422, "base_model_not_allowed")


def test_a_small_lora_fits_unchanged(client: TestClient, acme: ApiTenant) -> None:
    body = {
        "base_model": "sd15",
        "dataset_id": acme.dataset_id,
        "params": {"method": "lora", "rank": 8},
        "training": {"resolution": 512, "batch_size": 4, "fit": "auto"},
    }
    response = post(client, acme, body)
    assert response.status_code == 201, response.text
    memory = response.json()["memory"]
    assert (memory["fits"], memory["changes"], memory["architecture"]) == (True, [], "sd15")
    assert memory["estimate"]["peak_bytes"] + memory["reserve_bytes"] < 24 * GIB
    assert response.json()["training"]["batch_size"] == 4


def test_a_base_of_unknown_architecture_is_accepted_without_an_estimate(
    client: TestClient, acme: ApiTenant
) -> None:
    response = post(client, acme, dreambooth_sdxl(acme.dataset_id) | {"base_model": "private"})
    assert response.status_code == 201, response.text
    assert response.json()["memory"] is None
    plan = post(client, acme, dreambooth_sdxl(acme.dataset_id) | {"base_model": "private"}, dry_run="true")
    assert (plan.json()["fits"], plan.json()["memory"]) == (None, None)


def test_a_declared_fine_tune_is_planned_like_its_architecture(client: TestClient, acme: ApiTenant) -> None:
    body = dreambooth_sdxl(acme.dataset_id) | {"base_model": "juggernaut-xl"}
    assert_problem(post(client, acme, body), 422, "job_does_not_fit")


def test_a_live_announced_worker_adds_its_memory(
    client: TestClient, acme: ApiTenant, fit_settings: Settings
) -> None:
    refused = post(client, acme, dreambooth_sdxl(acme.dataset_id)).json()
    needed = refused["estimate"]["peak_bytes"] + refused["reserve_bytes"]
    # A CPU worker has no accelerator limit and does not count, however much RAM it has.
    announce(fit_settings, "cpu:1", DeviceInfo("cpu", "x86_64", 4 * needed, bitsandbytes=False))
    assert_problem(post(client, acme, dreambooth_sdxl(acme.dataset_id)), 422, "job_does_not_fit")
    big = needed + GIB
    announce(fit_settings, "gpu:1", DeviceInfo("cuda", "big card", big, bitsandbytes=True))
    response = post(client, acme, dreambooth_sdxl(acme.dataset_id))
    assert response.status_code == 201, response.text
    memory = response.json()["memory"]
    assert (memory["fits"], memory["changes"], memory["capacity_bytes"]) == (True, [], big)
    assert response.json()["training"]["batch_size"] == 8


def test_the_embedded_default_checks_nothing_but_still_estimates(
    api_client: TestClient, api_settings: Settings
) -> None:
    tenant = make_api_tenant(api_settings, "solo")
    body = {"base_model": "tiny-sd", "dataset_id": tenant.dataset_id, "params": {"method": "lora"}}
    response = api_client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    memory = response.json()["memory"]
    assert (memory["fits"], memory["capacity_bytes"], memory["changes"]) == (None, None, [])
    assert memory["architecture"] == "tiny-sd" and memory["estimate"]["peak_bytes"] > 0


def test_the_base_model_listing_knows_hub_bases_offline(client: TestClient, acme: ApiTenant) -> None:
    listed = {m["id"]: m for m in client.get("/v1/base-models", headers=acme.headers).json()["data"]}
    assert (listed["sdxl-base"]["family"], listed["sdxl-base"]["resolution"]) == ("sdxl", 1024)
    assert (listed["sd15"]["family"], listed["sd15"]["resolution"]) == ("sd", 512)
    assert (listed["juggernaut-xl"]["family"], listed["juggernaut-xl"]["resolution"]) == ("sdxl", 1024)
    assert (listed["private"]["family"], listed["private"]["resolution"]) == (None, None)
    assert (listed["tiny-sd"]["family"], listed["tiny-sd"]["resolution"]) == ("sd", 32)


# --- architectures and capacity, torch-free ----------------------------------------------------


def test_architectures_are_known_without_downloading(fit_settings: Settings, tmp_path: Path) -> None:
    assert architecture_for("sdxl-base", fit_settings) is KNOWN["sdxl"]
    assert architecture_for("juggernaut-xl", fit_settings) is KNOWN["sdxl"]
    assert architecture_for("tiny-sd", fit_settings) is KNOWN["tiny-sd"]
    assert architecture_for("private", fit_settings) is None
    unknown_hub = Settings(base_models={"x": "hf:someone/unheard-of"})
    assert architecture_for("x", unknown_hub) is None
    described = describe_base("sdxl-base", fit_settings)
    assert (described.family, described.architecture) == ("sdxl", KNOWN["sdxl"].signature())
    assert describe_base("private", fit_settings).architecture is None


def test_base_architectures_are_validated_at_start() -> None:
    with pytest.raises(ValueError, match="not in base_models"):
        Settings(base_architectures={"nope": "sdxl"})
    with pytest.raises(ValueError, match="known: "):
        Settings(base_models={"x": "hf:a/b"}, base_architectures={"x": "sd3"})
    with pytest.raises(ValueError, match="positive"):
        Settings(train_worker_memory_gib=[0])


def test_capacity_is_the_largest_live_cuda_worker_or_configured_class(
    db_session: Session, db_url: str
) -> None:
    settings = Settings(database_url=db_url, train_worker_memory_gib=[24, 48])
    assert training_capacity(session=db_session, settings=settings).memory_bytes == 48 * GIB
    device = DeviceInfo("cuda", "H100", 80 * GIB, bitsandbytes=True)
    workers.announce(session=db_session, worker_id="a:1", hostname="a", queues="train", device=device)
    capacity = training_capacity(session=db_session, settings=settings)
    assert (capacity.memory_bytes, capacity.bitsandbytes) == (80 * GIB, True)
    # An announcement that stopped being refreshed no longer counts.
    lapsed = Settings(database_url=db_url, worker_live_s=0.001, worker_announce_s=0.0001)
    time.sleep(0.01)
    assert training_capacity(session=db_session, settings=lapsed) is None
    workers.retire(session=db_session, worker_id="a:1")
    assert workers.live_workers(session=db_session, live_s=60) == []


def test_plan_job_without_any_capacity_estimates_only(db_session: Session, db_url: str) -> None:
    fit = plan_job(spec=lora_spec("ds_x"), settings=Settings(database_url=db_url), session=db_session)
    assert fit.fits is None and fit.memory is not None and fit.memory["capacity_bytes"] is None
    assert db_session.query(Job).count() == 0


# --- the worker's announcement -----------------------------------------------------------------


def test_a_training_worker_announces_itself_while_it_runs(db_session: Session, db_url: str) -> None:
    settings = Settings(database_url=db_url, worker_announce_s=0.05, worker_live_s=5)
    announcer = Announcer(settings, "train", detect_device=lambda _: GPU_24)
    announcer.start()
    deadline = time.monotonic() + 10
    while not workers.live_workers(session=db_session, live_s=5) and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = workers.live_workers(session=db_session, live_s=5)
    assert (row.id, row.device, row.memory_bytes, row.queues) == (
        announcer.worker_id,
        "cuda",
        24 * GIB,
        "train",
    )
    announcer.stop()
    db_session.expire_all()
    assert workers.live_workers(session=db_session, live_s=5) == []


def test_the_device_probe_runs_apart_from_the_worker_process() -> None:
    # The worker's main process must not start CUDA: the probe is another interpreter.
    device = detect(Settings(device="auto"))
    assert device is not None and device.kind in ("cuda", "cpu") and device.memory_bytes > 0
    cpu = detect(Settings(device="cpu"))
    assert cpu is not None and (cpu.kind, cpu.bitsandbytes) == ("cpu", False) and cpu.memory_bytes > 0
    code = "import sys, worker.announce; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_workers_with_bitsandbytes_fit_whatever_workers_without_it_fit(
    db_session: Session, db_url: str
) -> None:
    # 8-bit AdamW is tried first where workers have it; where it is not enough, Adafactor may be.
    spec = JobSpec.model_validate(dreambooth_sdxl("ds_x", fit="auto"))
    settings = Settings(database_url=db_url, base_models=BASES, train_worker_memory_gib=[24])
    without = plan_job(spec=spec, settings=settings, session=db_session)
    device = DeviceInfo("cuda", "24 GiB card", 24 * GIB, bitsandbytes=True)
    workers.announce(session=db_session, worker_id="bnb:1", hostname="b", queues="train", device=device)
    settings = Settings(database_url=db_url, base_models=BASES)
    with_8bit = plan_job(spec=spec, settings=settings, session=db_session)
    assert without.fits is True and with_8bit.fits is True
