"""End to end as users run it: HTTP API, real Celery worker processes, and either the full stack
(PostgreSQL, Redis, the S3 server) or the embedded defaults (SQLite, local files, filesystem broker).
"""

from __future__ import annotations

import io
import signal
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from PIL import Image
from safetensors.torch import load_file
from sqlalchemy import update

from cli.client import AtelierClient
from cli.demo import PROMPT, make_dataset_zip
from core.db import session_scope
from core.models import Generation
from core.timeutil import utcnow
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _job_body(dataset_id: str, **training: object) -> dict:
    return {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4, "alpha": 2},
        "training": {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 2, "seed": 1, **training},
    }


def _upload(client: AtelierClient, tmp_path: Path) -> str:
    dataset = client.upload_dataset([make_dataset_zip(tmp_path / "ds.zip", count=4)])
    assert dataset["status"] == "ready" and dataset["image_count"] == 4
    return dataset["id"]


def _wait_for(predicate, timeout_s: float, what: str, stack: Stack):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(
        f"timed out waiting for {what}\n--- worker logs ---\n"
        f"{stack.log('worker')}\n{stack.log('worker-generate')}"
    )


def _train_generate_download(stack: Stack, tmp_path: Path) -> None:
    client = stack.client()
    dataset_id = _upload(client, tmp_path)
    body = _job_body(dataset_id, checkpoint_every=3, sample_prompts=[PROMPT], sample_every=3)
    job = client.create_job(body)
    job = client.wait(job["id"], timeout_s=600)
    assert job["status"] == "succeeded", (job["error"], stack.log("worker"))
    assert job["attempt"] == 1 and job["progress"]["step"] == 6

    artifact = client.artifact(job["artifact_id"])
    names = {f["name"] for f in artifact["manifest"]["files"]}
    assert "pytorch_lora_weights.safetensors" in names
    weights = client.download_artifact(artifact["id"], tmp_path / "lora.safetensors")
    assert any(".lora_A." in key for key in load_file(weights))

    samples = client.get(f"/v1/jobs/{job['id']}/samples")["data"]
    assert samples and Image.open(io.BytesIO(client.fetch(samples[0]["url"]))).size[0] > 0
    types = [e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", limit=1000)["data"]]
    assert types[0] == "created" and "started" in types and "checkpoint" in types and types[-1] == "succeeded"

    gen = client.generate(
        {
            "base_model": "tiny-sd",
            "prompt": PROMPT,
            "steps": 4,
            "seed": 3,
            "loras": [{"artifact_id": artifact["id"], "scale": 1.0}],
        }
    )
    gen = client.wait_generation(gen["id"], timeout_s=300)
    assert gen["status"] == "succeeded", gen["error"]
    image = Image.open(io.BytesIO(client.fetch(gen["images"][0]["url"])))
    assert "parameters" in image.info  # generation parameters travel inside the PNG

    other = stack.client("intruder")
    with pytest.raises(Exception, match="404"):
        other.job(job["id"])
    with pytest.raises(Exception, match="404"):
        other.artifact(artifact["id"])


def test_full_stack_train_generate_download(full_stack: Stack, tmp_path: Path) -> None:
    full_stack.start_api()
    full_stack.start_workers()
    ready = full_stack.client().get("/readyz")
    assert ready["status"] == "ready", ready
    _train_generate_download(full_stack, tmp_path)


def test_embedded_train_generate_download(embedded_stack: Stack, tmp_path: Path) -> None:
    embedded_stack.start_api(with_worker=True)
    _train_generate_download(embedded_stack, tmp_path)


def _pool_child(worker: psutil.Process) -> psutil.Process | None:
    children = worker.children(recursive=True)
    return children[0] if children else None


def test_killed_worker_job_resumes_from_checkpoint_once(full_stack: Stack, tmp_path: Path) -> None:
    full_stack.start_api()
    worker = psutil.Process(full_stack.start_workers().pid)
    client = full_stack.client()
    dataset_id = _upload(client, tmp_path)
    job = client.create_job(_job_body(dataset_id, max_steps=100, checkpoint_every=10))

    def first_checkpoint() -> int | None:
        return client.job(job["id"])["checkpoint_step"]

    step_at_kill = _wait_for(first_checkpoint, 400, "the first checkpoint", full_stack)
    child = _pool_child(worker)
    assert child is not None, "the training runs in a pool child process"
    child.send_signal(signal.SIGKILL)

    final = client.wait(job["id"], timeout_s=600)
    assert final["status"] == "succeeded", (final["error"], full_stack.log("worker"))
    assert final["attempt"] == 2
    events = client.get(f"/v1/jobs/{job['id']}/events", limit=1000)["data"]
    resumed = [e for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2
    # It resumed from a checkpoint the first attempt made, at or after the one seen before the kill.
    first_checkpoints = [e["data"]["step"] for e in events if e["type"] == "checkpoint" and e["attempt"] == 1]
    assert resumed[0]["data"]["from_step"] == max(first_checkpoints) >= step_at_kill
    assert [e["type"] for e in events].count("succeeded") == 1
    artifacts = [a for a in client.get("/v1/artifacts", limit=100)["data"] if a["job_id"] == job["id"]]
    assert len(artifacts) == 1


def test_generation_whose_message_was_lost_still_runs(embedded_stack: Stack) -> None:
    """A generation's row is committed before its message is sent; when the message is lost
    (broker restarted empty, API killed between the two), the reaper sends another."""
    embedded_stack.start_api()  # no workers yet: the message waits in the broker's folder
    client = embedded_stack.client()
    generation = client.generate({"base_model": "tiny-sd", "prompt": PROMPT, "steps": 2, "seed": 3})
    messages = list((embedded_stack.settings().broker_folder / "queue").glob("*.generate.msg"))
    assert len(messages) == 1
    messages[0].unlink()
    with session_scope(embedded_stack.database_url) as session:  # sent long enough ago to be re-sent
        long_ago = utcnow() - timedelta(seconds=60)
        session.execute(
            update(Generation)
            .where(Generation.id == generation["id"])
            .values(created_at=long_ago, dispatched_at=long_ago)
        )
    embedded_stack.start_workers()
    done = client.wait_generation(generation["id"], timeout_s=180)
    assert done["status"] == "succeeded", (done["error"], embedded_stack.log("worker-generate"))
    assert len(done["images"]) == 1
