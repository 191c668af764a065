"""Progress a person can follow: a job reports its phases in order with done/total, the worker writes
them to the job row at a bounded rate, and the CLI prints one plain line per update into a log.
"""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cli.progress import ProgressBar, render
from core.config import Settings
from core.jobs import states as jobs
from core.jobs.hooks import Heartbeat
from core.jobs.runner import run_training_job
from core.storage.factory import make_storage
from core.training.phases import PHASES
from tests.db_fixtures import make_api_tenant
from tests.test_generation_api import png

# What a DreamBooth job with class images goes through once its base is built.
DREAMBOOTH_PHASES = [
    "loading_base",
    "generating_class_images",
    "caching_latents",
    "training",
    "exporting",
    "uploading",
]


def _upload_dataset(client: TestClient, headers: dict[str, str], count: int) -> str:
    colours = [(255, 0, 255), (250, 10, 240), (240, 0, 250)]
    files = [("files", (f"{i}.png", png((32, 32), colours[i % 3]), "image/png")) for i in range(count)]
    response = client.post("/v1/datasets", files=files, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_dreambooth_job_reports_its_phases_in_order_with_growing_counts(
    api_client: TestClient, api_settings: Settings, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = make_api_tenant(api_settings, "progress")
    dataset_id = _upload_dataset(api_client, tenant.headers, count=3)
    body = {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {
            "method": "dreambooth",
            "instance_prompt": "a photo of sks",
            "class_prompt": "a solid image",
            "num_class_images": 6,  # two pipeline calls of up to four images
            "class_inference_steps": 2,
        },
        "training": {"max_steps": 2, "batch_size": 2, "seed": 1},
    }
    response = api_client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["progress"]["phase"] is None  # queued: no attempt has reported yet

    # Everything the hooks hand to the heartbeat, which then writes it at its own pace.
    reports: list[dict[str, Any]] = []
    report = Heartbeat.report

    def recorded(self: Heartbeat, **fields: Any) -> None:
        reports.append(fields)
        report(self, **fields)

    monkeypatch.setattr(Heartbeat, "report", recorded)
    settings = api_settings.model_copy(update={"model_cache": model_cache})
    storage = make_storage(settings)
    assert run_training_job(job_id=job_id, settings=settings, storage=storage, worker_id="w") == "succeeded"

    events = api_client.get(f"/v1/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    entered = [event["data"]["phase"] for event in events if event["type"] == "phase"]
    # The shared model cache may hold tiny-sd already, or this job builds it first.
    assert entered == DREAMBOOTH_PHASES
    assert entered == sorted(entered, key=PHASES.index)

    def counts(phase: str) -> list[tuple[int, int]]:
        return [(r["phase_done"], r["phase_total"]) for r in reports if r.get("phase") == phase]

    assert counts("generating_class_images") == [(0, 6), (4, 6), (6, 6)]
    caching = counts("caching_latents")
    assert caching[0] == (0, 9) and caching[-1] == (9, 9)  # 3 instance + 6 class images
    assert [done for done, _ in caching] == sorted(done for done, _ in caching)
    assert counts("loading_base")[-1] == (3, 3)  # text encoder, VAE, UNet
    assert counts("training")[-1] == (2, 2)
    assert counts("exporting") == [(0, 1), (1, 1)]
    uploaded = counts("uploading")
    assert uploaded[-1][0] == uploaded[-1][1] > 1

    progress = api_client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()["progress"]
    assert progress["phase"] == "uploading" and progress["phase_done"] == progress["phase_total"]
    assert (progress["step"], progress["total"]) == (2, 2)  # the existing fields stay


def test_progress_reaches_the_job_row_at_a_bounded_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[float, dict[str, Any]]] = []

    def heartbeat(**fields: Any) -> bool:
        writes.append((time.monotonic(), fields))
        return False

    monkeypatch.setattr(jobs, "heartbeat", heartbeat)
    interval = 0.1
    settings = Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        heartbeat_s=30,  # only progress wakes the writer in this test
        lease_s=120,
        progress_interval_s=interval,
    )
    beat = Heartbeat(settings=settings, job_id="job_1", attempt=1)
    beat.start()
    reported = 2000
    try:
        for done in range(1, reported + 1):
            beat.report(phase="caching_latents", phase_done=done, phase_total=reported)
            time.sleep(0.0002)
        deadline = time.monotonic() + 30
        while not (writes and writes[-1][1]["phase_done"] == reported) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        beat.stop()
        beat.join(5)
    assert not beat.is_alive()
    # The newest figures arrive; the ones between writes are skipped, not queued.
    last = writes[-1][1]
    assert (last["job_id"], last["phase"], last["phase_done"], last["phase_total"]) == (
        "job_1",
        "caching_latents",
        reported,
        reported,
    )
    assert 2 <= len(writes) < reported // 10
    done = [fields["phase_done"] for _, fields in writes]
    assert done == sorted(done)
    # Never two writes closer than the interval (a little slack for the clock's resolution).
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(writes)]
    assert min(gaps) >= interval * 0.95


def _snapshot(phase: str | None, done: int | None = None, total: int | None = None, **fields: Any) -> dict:
    return {"step": 0, "total": 60, "phase": phase, "phase_done": done, "phase_total": total} | fields


def test_a_log_gets_one_plain_line_per_update_and_never_a_carriage_return() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, tty=False, label="job_1")
    training = {"step": 10, "loss": 0.12, "images_per_s": 3.4, "it_per_s": 0.85, "eta_s": 59}
    updates = [
        ("queued", _snapshot(None)),
        ("running", _snapshot("downloading_base", 0, 950)),
        ("running", _snapshot("downloading_base", 500, 950)),
        ("running", _snapshot("downloading_base", 500, 950)),  # unchanged: no line
        ("running", _snapshot("caching_latents", 12, 40)),
        ("running", _snapshot("training", 10, 60, **training)),
        ("succeeded", _snapshot("uploading", 5, 5, step=60, loss=0.1)),
    ]
    for status, progress in updates:
        bar.update(status=status, progress=progress)
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "job_1 queued step 0/60",
        "job_1 running downloading_base 0/950",
        "job_1 running downloading_base 500/950",
        "job_1 running caching_latents 12/40",
        "job_1 running training step 10/60 loss 0.1200 3.4 img/s ETA 0:59",
        "job_1 succeeded step 60/60 loss 0.1000",
    ]


def test_a_terminal_bar_follows_the_phase_then_the_steps() -> None:
    half = render("running", _snapshot("generating_class_images", 3, 6), width=10)
    assert "|█████     |" in half and "generating_class_images 3/6" in half
    steps = render("running", _snapshot("training", 30, 60, step=30, loss=0.5), width=10)
    assert "|█████     |" in steps and "training 30/60" in steps and "loss 0.5000" in steps
    # A server without phases (or a queued job) draws the steps as before.
    assert "0/60" in render("queued", {"step": 0, "total": 60})

    screen = io.StringIO()
    bar = ProgressBar(screen, tty=True)
    bar.update(status="running", progress=_snapshot("caching_latents", 1, 4))
    bar.update(status="running", progress=_snapshot("caching_latents", 4, 4))
    bar.close()
    assert screen.getvalue().count("\r") == 2 and screen.getvalue().endswith("caching_latents 4/4\n")
