"""Observability: /metrics (database, Redis and filesystem brokers, sources down), the workers' GPU
memory endpoint, structured JSON logs with the job id and attempt, and the OpenAPI examples.

No torch: a fake CUDA module stands in where GPU memory is sampled.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from api.deps import settings_dep
from api.main import create_app
from api.openapi_examples import GENERATION_EXAMPLES, JOB_EXAMPLES
from core.config import Settings
from core.db import session_scope
from core.generation.params import GenerationSpec
from core.jobs import creation
from core.jobs import runner as job_runner
from core.jobs import states as jobs
from core.logs import configure_logging, log_context
from core.models import Job, JobStatus
from core.spec.catalogue import CATALOGUE
from core.spec.job import JobSpec
from core.spec.training import TrainingParams
from core.timeutil import utcnow
from tests.db_fixtures import ApiTenant, insert_dataset, lora_spec, make_tenant
from tests.service_stack import REDIS_HOST, free_port
from worker.app import GENERATE_QUEUE, MAINTENANCE_QUEUE, TRAIN_QUEUE, make_celery

REPO = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels); the official parser must accept it."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(settings: Settings) -> tuple[str, Samples]:
    app = create_app(migrate=False)
    app.dependency_overrides[settings_dep] = lambda: settings
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text, parse(response.text)


# --- /metrics from the database -------------------------------------------------------------------


def _job(session: Any, tenant: str, dataset: str, method: str, batch_size: int = 1) -> str:
    spec = lora_spec(dataset).model_copy(
        update={"training": TrainingParams(max_steps=10, batch_size=batch_size)}
    )
    job, _ = creation.create_job(
        session=session, tenant_id=tenant, spec=spec, idempotency_key=None, max_attempts=3
    )
    # The spec stays a LoRA one; the metrics read the method column, which is all this test varies.
    session.execute(update(Job).where(Job.id == job.id).values(method=method))
    session.commit()
    return job.id


def _times(session: Any, job_id: str, *, run_s: float | None, turnaround_s: float) -> None:
    end = utcnow()
    started = end - timedelta(seconds=run_s) if run_s is not None else None
    values = {"created_at": end - timedelta(seconds=turnaround_s), "finished_at": end, "started_at": started}
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def _insert_jobs(db_url: str) -> list[str]:
    """lora: 2 queued + 1 succeeded (90 s run, 120 s turnaround); dreambooth: 1 running at 8 img/s with
    batch 4; textual_inversion: 1 failed (4000 s run); controlnet: 1 canceled while queued."""
    with session_scope(db_url) as session:
        tenant = make_tenant(session, "acme")
        dataset = insert_dataset(session, tenant)
        queued = [_job(session, tenant, dataset, "lora") for _ in range(2)]

        done = _job(session, tenant, dataset, "lora")
        attempt = jobs.claim(session=session, job_id=done, worker_id="w", lease_s=60)
        artifact = jobs.ArtifactRecord(storage_prefix="x", manifest={"metrics": {}})
        jobs.finish(
            session=session, job_id=done, attempt=attempt, status=JobStatus.succeeded, artifact=artifact
        )
        _times(session, done, run_s=90, turnaround_s=120)

        running = _job(session, tenant, dataset, "dreambooth", batch_size=4)
        attempt = jobs.claim(session=session, job_id=running, worker_id="w", lease_s=60)
        jobs.heartbeat(
            session=session, job_id=running, attempt=attempt, lease_s=60, step=3, loss=0.1, images_per_s=8.0
        )

        failed = _job(session, tenant, dataset, "textual_inversion")
        attempt = jobs.claim(session=session, job_id=failed, worker_id="w", lease_s=60)
        jobs.finish(session=session, job_id=failed, attempt=attempt, status=JobStatus.failed, error_code="x")
        _times(session, failed, run_s=4000, turnaround_s=4100)

        canceled = _job(session, tenant, dataset, "controlnet")
        jobs.request_cancel(session=session, job=session.get(Job, canceled))
        _times(session, canceled, run_s=None, turnaround_s=5)
        return [tenant, dataset, *queued, done, running, failed, canceled]


def test_metrics_count_jobs_by_method_and_status_from_the_database(db_url: str, tmp_path: Path) -> None:
    ids = _insert_jobs(db_url)
    text, samples = scrape(Settings(home=tmp_path, database_url=db_url, broker_url="memory://"))

    assert sample(samples, "atelier_database_up") == 1
    expected = {
        ("lora", "queued"): 2,
        ("lora", "succeeded"): 1,
        ("dreambooth", "running"): 1,
        ("textual_inversion", "failed"): 1,
        ("controlnet", "canceled"): 1,
    }
    for method in CATALOGUE:  # every pair is present, zeros included, so alerts see the series
        for status in JobStatus:
            count = sample(samples, "atelier_jobs", method=method, status=str(status))
            assert count == expected.get((method, str(status)), 0), (method, status)

    # The running job's latest rate: 8 images/s at batch 4 is 2 optimizer steps/s.
    assert sample(samples, "atelier_training_images_per_second", method="dreambooth") == 8.0
    assert sample(samples, "atelier_training_steps_per_second", method="dreambooth") == 2.0
    assert sample(samples, "atelier_training_steps_per_second", method="lora") == 0.0

    run = {"method": "lora", "status": "succeeded"}
    assert sample(samples, "atelier_job_duration_seconds_bucket", le="60.0", **run) == 0
    assert sample(samples, "atelier_job_duration_seconds_bucket", le="120.0", **run) == 1
    assert sample(samples, "atelier_job_duration_seconds_count", **run) == 1
    assert sample(samples, "atelier_job_duration_seconds_sum", **run) == pytest.approx(90, abs=0.01)
    assert sample(samples, "atelier_job_turnaround_seconds_sum", **run) == pytest.approx(120, abs=0.01)
    failed = {"method": "textual_inversion", "status": "failed"}
    assert sample(samples, "atelier_job_duration_seconds_bucket", le="3600.0", **failed) == 0
    assert sample(samples, "atelier_job_duration_seconds_bucket", le="7200.0", **failed) == 1
    assert sample(samples, "atelier_job_duration_seconds_bucket", le="+Inf", **failed) == 1
    # Canceled before it ever ran: no run time, but a turnaround.
    canceled = {"method": "controlnet", "status": "canceled"}
    assert ("atelier_job_duration_seconds_count", frozenset(canceled.items())) not in samples
    assert sample(samples, "atelier_job_turnaround_seconds_count", **canceled) == 1

    assert sample(samples, "atelier_datasets", status="ready") == 1
    assert sample(samples, "atelier_artifacts", method="lora") == 1
    assert sample(samples, "atelier_generations", status="queued") == 0
    # No tenant data: no tenant, dataset or job id appears anywhere in the scrape.
    assert not [i for i in ids if i in text]
    label_names = {name for _, labels in samples for name, _ in labels}
    assert label_names <= {"method", "status", "queue", "le"}


def test_metrics_still_answer_when_the_database_and_broker_are_down(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2",
        broker_url="redis://127.0.0.1:1/0",
    )
    started = time.monotonic()
    _, samples = scrape(settings)
    assert time.monotonic() - started < 8
    assert sample(samples, "atelier_database_up") == 0
    assert sample(samples, "atelier_broker_up") == 0
    assert not [key for key in samples if key[0].startswith(("atelier_jobs", "atelier_queue"))]


# --- queue depth ----------------------------------------------------------------------------------


@pytest.fixture
def redis_db12() -> Iterator[str]:
    """Redis database 12, emptied before and after (database 11 belongs to the end-to-end stacks)."""
    url = f"{REDIS_HOST}/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _send(settings: Settings, counts: dict[str, int], **options: Any) -> None:
    app = make_celery(settings)
    try:
        for queue, count in counts.items():
            for n in range(count):
                app.send_task("atelier.test_only", args=[n], queue=queue, **options)
    finally:
        app.close()


def test_queue_depth_on_redis_counts_every_priority_list(redis_db12: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'a.db'}", broker_url=redis_db12)
    _send(settings, {TRAIN_QUEUE: 3, GENERATE_QUEUE: 1})
    _send(settings, {TRAIN_QUEUE: 1}, priority=9)  # kombu keeps it in a list of its own
    assert redis.Redis.from_url(redis_db12).llen(TRAIN_QUEUE) == 3

    _, samples = scrape(settings)
    assert sample(samples, "atelier_broker_up") == 1
    assert sample(samples, "atelier_queue_messages", queue=TRAIN_QUEUE) == 4
    assert sample(samples, "atelier_queue_messages", queue=GENERATE_QUEUE) == 1
    assert sample(samples, "atelier_queue_messages", queue=MAINTENANCE_QUEUE) == 0
    assert sample(samples, "atelier_broker_unacked_messages") == 0
    assert sample(samples, "atelier_database_up") == 0  # never migrated: reported, not fatal


def test_queue_depth_on_the_filesystem_broker(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'a.db'}")
    assert settings.embedded_broker
    _send(settings, {GENERATE_QUEUE: 2, MAINTENANCE_QUEUE: 1})
    _, samples = scrape(settings)
    assert sample(samples, "atelier_broker_up") == 1
    assert sample(samples, "atelier_queue_messages", queue=TRAIN_QUEUE) == 0
    assert sample(samples, "atelier_queue_messages", queue=GENERATE_QUEUE) == 2
    assert sample(samples, "atelier_queue_messages", queue=MAINTENANCE_QUEUE) == 1


# --- GPU memory from the workers ------------------------------------------------------------------

GPU_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, types, urllib.request
    from worker.metrics import sample_gpu_memory, serve_worker_metrics

    port = int(sys.argv[1])
    serve_worker_metrics(port=port, host="127.0.0.1")
    assert not sample_gpu_memory()  # the server's own process has no CUDA and must not start it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # as a pool child training on the GPU
        cuda = types.SimpleNamespace(
            is_initialized=lambda: True, current_device=lambda: 0, mem_get_info=lambda d: (30, 80),
            memory_allocated=lambda d: 1234, memory_reserved=lambda d: 4096,
            max_memory_allocated=lambda d: 2048,
        )
        sys.modules["torch"] = types.SimpleNamespace(cuda=cuda)
        assert sample_gpu_memory()
        os.write(write, b"x")
        signal.pause()
    os.read(read, 1)
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    print(scrape())
    os.kill(child, signal.SIGKILL)  # dies without saying so, as under the OOM killer
    os.waitpid(child, 0)
    print("=====")
    print(scrape())
    """
)


def test_worker_metrics_serve_the_pool_childrens_gpu_memory_and_forget_dead_ones() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    run = subprocess.run(
        [sys.executable, "-c", GPU_SCRIPT, str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    alive, dead = (parse(part) for part in run.stdout.split("====="))
    assert sample(alive, "atelier_gpu_memory_allocated_bytes", device="0") == 1234
    assert sample(alive, "atelier_gpu_memory_reserved_bytes", device="0") == 4096
    assert sample(alive, "atelier_gpu_memory_peak_bytes", device="0") == 2048
    assert sample(alive, "atelier_gpu_memory_total_bytes", device="0") == 80
    assert not [key for key in dead if key[0].startswith("atelier_gpu")]


# --- structured logs ------------------------------------------------------------------------------


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Atelier's handler on the root logger, writing to a buffer; removed afterwards."""
    monkeypatch.delenv("ATELIER_LOG_FORMAT", raising=False)
    monkeypatch.delenv("ATELIER_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = configure_logging(default_format="json", stream=buffer, force=True)
    assert handler is not None
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]  # one JSON object per line


def test_json_lines_carry_job_id_and_attempt_inside_a_bound_context_only(json_log: io.StringIO) -> None:
    log = logging.getLogger("atelier.test")
    log.info("before")
    with log_context(job_id="job_1", attempt=2):
        log.info("step %d", 5, extra={"loss": 0.25, "path": Path("/x")})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("other.library").exception("failed")
        with log_context(step=7):
            log.warning("nested")
        thread = threading.Thread(target=log.info, args=("bare thread",))  # fresh context: no fields
        thread.start()
        thread.join()
    log.info("after")

    before, step, failed, nested, bare, after = records(json_log)
    assert step["message"] == "step 5" and step["level"] == "INFO" and step["logger"] == "atelier.test"
    assert step["timestamp"].endswith("+00:00") and step["loss"] == 0.25 and step["path"] == "/x"
    for inside in (step, failed, nested):
        assert (inside["job_id"], inside["attempt"]) == ("job_1", 2)
    assert "ValueError: boom" in failed["exception"] and failed["level"] == "ERROR"
    assert nested["step"] == 7 and "step" not in step
    for outside in (before, bare, after):
        assert "job_id" not in outside and "attempt" not in outside


def test_a_training_attempt_logs_its_job_id_and_attempt_also_from_the_heartbeat(
    json_log: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    from core.db import upgrade

    upgrade(url)
    with session_scope(url) as session:
        tenant = make_tenant(session)
        job, _ = creation.create_job(
            session=session,
            tenant_id=tenant,
            spec=lora_spec(insert_dataset(session, tenant)),
            idempotency_key=None,
            max_attempts=3,
        )
    beats = threading.Event()

    def failing_heartbeat(**_: Any) -> bool:
        beats.set()
        raise ConnectionError("database blip")  # logged by the heartbeat thread, then retried

    def attempt(*args: Any) -> str:  # the training itself, without torch
        logging.getLogger("core.training.loop").info("step 1", extra={"step": 1})
        assert beats.wait(5)
        time.sleep(0.05)
        return "succeeded"

    monkeypatch.setattr(jobs, "heartbeat", failing_heartbeat)
    monkeypatch.setattr(job_runner, "_attempt", attempt)
    settings = Settings(home=tmp_path, database_url=url, heartbeat_s=0.02, lease_s=1)
    assert (
        job_runner.run_training_job(job_id=job.id, settings=settings, storage=None, worker_id="w")
        == "succeeded"
    )
    logging.getLogger("core.worker").info("between tasks")

    lines = records(json_log)
    step = next(r for r in lines if r["message"] == "step 1")
    heartbeat = next(r for r in lines if r["message"].startswith("heartbeat for job"))
    assert (step["job_id"], step["attempt"], step["step"]) == (job.id, 1, 1)
    assert (heartbeat["job_id"], heartbeat["attempt"]) == (job.id, 1)
    assert "ConnectionError: database blip" in heartbeat["exception"]
    assert "job_id" not in next(r for r in lines if r["message"] == "between tasks")


def test_text_format_and_level_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_LOG_FORMAT", "text")
    monkeypatch.setenv("ATELIER_LOG_LEVEL", "warning")
    root, buffer = logging.getLogger(), io.StringIO()
    level = root.level
    handler = configure_logging(default_format="json", stream=buffer, force=True)
    try:
        with log_context(job_id="job_2", attempt=1):
            logging.getLogger("x").info("hidden")
            logging.getLogger("x").warning("shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert buffer.getvalue().rstrip().endswith("WARNING x: shown [job_id=job_2 attempt=1]")
    assert "hidden" not in buffer.getvalue()
    monkeypatch.setenv("ATELIER_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="ATELIER_LOG_FORMAT"):
        configure_logging(stream=buffer, force=True)


def _role(
    tmp_path: Path, *args: str, until: str, check: Any = None, timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Run `atelier <role>` on the embedded defaults until `until` is logged (then `check()` while it
    still runs); returns its JSON records."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "PROMETHEUS_"))}
    env["ATELIER_HOME"] = str(tmp_path)
    err = tmp_path / "stderr.log"
    with err.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + timeout_s
            while until not in err.read_text() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert until in err.read_text(), err.read_text()
            if check is not None:
                check()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                # The stop bound: the shutdown grace (20 s) and 5 s more (README, "Stopping").
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
    lines = [line for line in err.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def test_beat_logs_json_lines(tmp_path: Path) -> None:
    logged = _role(tmp_path, "beat", until="Starting")
    assert any(r["logger"] == "celery.beat" and r["level"] == "INFO" for r in logged), logged


def test_worker_logs_json_lines_and_serves_its_metrics_port(tmp_path: Path) -> None:
    port = free_port()

    def scrape_worker() -> None:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200
        parse(response.text)  # no job has used CUDA: valid and without GPU series

    args = ("worker", "--queues", "maintenance", "--metrics-port", str(port))
    logged = _role(tmp_path, *args, until=" ready.", check=scrape_worker)
    assert any(r["message"].endswith(" ready.") for r in logged), logged
    assert any(r["message"] == f"worker metrics on http://0.0.0.0:{port}/metrics" for r in logged)


# --- OpenAPI examples -----------------------------------------------------------------------------


def test_every_method_has_a_valid_worked_example_in_the_openapi_document() -> None:
    document = create_app(migrate=False).openapi()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["examples"] == JOB_EXAMPLES and set(JOB_EXAMPLES) == set(CATALOGUE)
    for method, example in JOB_EXAMPLES.items():
        spec = JobSpec.model_validate(example["value"])
        assert spec.params.method == method and example["summary"]
    generation = document["paths"]["/v1/generations"]["post"]["requestBody"]["content"]["application/json"]
    assert generation["examples"] == GENERATION_EXAMPLES
    for example in GENERATION_EXAMPLES.values():
        assert GenerationSpec.model_validate(example["value"]).uses()
    composed = GenerationSpec.model_validate(GENERATION_EXAMPLES["composed"]["value"])
    assert {use.method for use in composed.uses()} == {"ip_adapter", "controlnet", "lora"}


def test_every_job_example_is_accepted_by_the_api(
    api_client: TestClient, acme: ApiTenant, api_settings: Settings
) -> None:
    with session_scope(api_settings.database_url) as session:
        # hyper_lora trains on one folder per concept.
        names = [f"concept-{i // 2}/{i}.png" for i in range(8)]
        concepts = insert_dataset(session, acme.tenant_id, names=names)
    for method, example in JOB_EXAMPLES.items():
        dataset_id = concepts if method == "hyper_lora" else acme.dataset_id
        request = {**example["value"], "dataset_id": dataset_id}
        response = api_client.post("/v1/jobs", json=request, headers=acme.headers)
        assert response.status_code == 201, (method, response.text)
        assert response.json()["method"] == method


def test_metrics_endpoint_is_documented_and_needs_no_key(api_client: TestClient) -> None:
    assert "/metrics" in api_client.get("/openapi.json").json()["paths"]
    assert api_client.get("/metrics").status_code == 200
