"""The `atelier` CLI over the HTTP API.

Most tests run the commands (`cli.main.main`) in-process against the FastAPI app through its
TestClient, with the broker recorded and the worker's part played through core.jobs.states; the last test
runs the CLI as a subprocess, as users do, against `atelier serve` with its embedded worker: upload
a folder, train from YAML files with `--watch`, download the artifact, generate with it, cancel.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import api.routes.generations
import api.routes.jobs
from cli import commands
from cli.client import AtelierClient, StreamUnavailable
from cli.generate import image_use, scaled_use
from cli.jobspec import parse_value
from cli.main import build_parser, main
from cli.progress import ProgressBar, format_duration, render
from cli.sse import iter_sse
from core.config import Settings
from core.db import session_scope, upgrade
from core.jobs import states as jobs
from core.models import Generation, JobStatus
from core.storage.factory import make_storage
from core.tenants.keys import create_key
from tests.db_fixtures import ApiTenant, succeed_with_artifact
from tests.service_stack import Stack

WEIGHTS = "pytorch_lora_weights.safetensors"
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


class _KeptOpen(AtelierClient):
    # The TestClient is shared by every command of a test; closing it would end the app.
    def close(self) -> None:
        pass


@pytest.fixture
def cli(api_client: TestClient, acme: ApiTenant, monkeypatch: pytest.MonkeyPatch, capsys):  # type: ignore[no-untyped-def]
    """Runs `atelier ARGS...` in-process against the app, as acme; returns a Run."""
    monkeypatch.setattr(
        commands, "make_client", lambda args: _KeptOpen("http://testserver", acme.key.secret, http=api_client)
    )

    def run(*argv: str) -> Run:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        return Run(code, captured.out, captured.err)

    return run


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def make_folder(root: Path, count: int = 3, *, conditioned: int = 2) -> Path:
    """Images with captions, `conditioning/` images for the first few, and files that are skipped."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "conditioning").mkdir(exist_ok=True)
    for i in range(count):
        (root / f"sks_{i}.png").write_bytes(png_bytes(MAGENTA))
        (root / f"sks_{i}.txt").write_text("a photo of sks")
        if i < conditioned:
            (root / "conditioning" / f"sks_{i}.png").write_bytes(png_bytes(CYAN))
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "notes.md").write_text("not a caption")
    return root


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- pieces -------------------------------------------------------------------------------------


def test_sse_parsing_follows_the_format() -> None:
    stream = [": comment\n", "id: 7\n", "event: checkpoint\n", 'data: {"a":\n', "data: 1}\n", "\n"]
    stream += ["event: progress\n", "data: {}\n", "\n", "data: cut off"]
    events = list(iter_sse(stream))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("checkpoint", '{"a":\n1}', "7"),
        ("progress", "{}", "7"),  # the last event id carries over, as in browsers
    ]


def test_progress_line_shows_step_loss_rate_and_eta() -> None:
    line = render("running", {"step": 3, "total": 4, "loss": 0.12345, "it_per_s": 2.5, "eta_s": 3725})
    assert "3/4" in line and "loss 0.1235" in line and "2.50 it/s" in line and "ETA 1:02:05" in line
    assert render("queued", {"step": 0, "total": 4}).startswith("queued")
    assert format_duration(65) == "1:05"

    out = io.StringIO()
    bar = ProgressBar(out, tty=False)
    for step in (1, 1, 2):
        bar.update(status="running", progress={"step": step, "total": 2, "loss": 0.5})
    bar.note("checkpoint at step 2")
    assert out.getvalue().splitlines()[-1] == "checkpoint at step 2"
    assert len(out.getvalue().splitlines()) == 3  # a repeated step prints nothing in a log

    screen = io.StringIO()
    bar = ProgressBar(screen, tty=True)
    bar.update(status="running", progress={"step": 1, "total": 2})
    bar.note("checkpoint at step 1")
    bar.close()
    # Redrawn in place: the note clears the bar's line, prints, and draws the bar again below it.
    first = render("running", {"step": 1, "total": 2})
    assert screen.getvalue() == f"\r{first}\r{' ' * len(first)}\rcheckpoint at step 1\n{first}\n"


def test_set_values_and_artifact_uses_parse(tmp_path: Path) -> None:
    assert [parse_value(v) for v in ("4", "1e-3", "true", "[a, b c]", "attention+conv+ff")] == [
        4,
        0.001,
        True,
        ["a", "b c"],
        "attention+conv+ff",
    ]
    assert scaled_use("art_1:0.5", flag="--lora") == {"artifact_id": "art_1", "scale": 0.5}
    assert scaled_use("art_1", flag="--hypernetwork", field="strength") == {"artifact_id": "art_1"}
    image = tmp_path / "edges:v2.png"  # a colon in the path is part of the path
    image.write_bytes(png_bytes(CYAN))
    use = image_use(f"art_2:{image}:0.8", flag="--controlnet")
    assert use["scale"] == 0.8 and use["image"].startswith("data:image/png;base64,")
    assert image_use("art_2:img_0123", flag="--ip-adapter") == {"artifact_id": "art_2", "image": "img_0123"}


# --- datasets -----------------------------------------------------------------------------------


def test_upload_a_folder_and_a_zip_then_list_and_show(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = cli("datasets", "upload", str(make_folder(tmp_path / "photos")), "--name", "magenta")
    assert run.code == 0, run.err
    dataset_id = run.out.strip()
    assert dataset_id.startswith("ds_")
    assert "3 images accepted (3 captioned, 2 with conditioning), 0 rejected" in run.err
    assert "skipped 1 file(s) that are not images or captions: notes.md" in run.err  # .DS_Store: hidden

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png_bytes(MAGENTA))
        zf.writestr("a.txt", "a photo of sks")
        zf.writestr("broken.png", png_bytes(MAGENTA)[:40])
    run = cli("datasets", "upload", str(archive))
    assert run.code == 0, run.err
    zip_id = run.out.strip()
    assert "1 image accepted" in run.err and "rejected broken.png: unsupported_image_format" in run.err

    listing = cli("datasets", "list")
    assert listing.code == 0 and dataset_id in listing.out and zip_id in listing.out
    assert listing.lines[0].split() == ["ID", "STATUS", "IMAGES", "NAME", "CREATED"]
    shown = json.loads(cli("datasets", "show", dataset_id).out)
    assert shown["report"]["counts"]["conditioned"] == 2 and shown["name"] == "magenta"


def test_an_unusable_upload_is_a_usage_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "photo.png").write_bytes(png_bytes(MAGENTA))
    run = cli("datasets", "upload", str(tmp_path / "photo.png"))
    assert run.code == 2 and "expected a folder or a .zip file" in run.err
    (tmp_path / "empty").mkdir()
    run = cli("datasets", "upload", str(tmp_path / "empty"))
    assert run.code == 2 and "holds no images or captions" in run.err


# --- jobs ---------------------------------------------------------------------------------------


def _create(cli, tenant: ApiTenant, tmp_path: Path, *extra: str) -> Run:  # type: ignore[no-untyped-def]
    params = write_yaml(tmp_path / "params.yaml", "rank: 8\nalpha: 4\ntargets: attention\n")
    training = write_yaml(tmp_path / "training.yaml", "max_steps: 2\nlearning_rate: 1.0e-3\nseed: 3\n")
    return cli(
        "jobs", "create", "--method", "lora", "--dataset", tenant.dataset_id, "--base-model", "tiny-sd",
        "--params", str(params), "--training", str(training), *extra,
    )  # fmt: skip


def test_create_a_job_from_yaml_files_and_set_overrides(
    cli,
    acme: ApiTenant,
    api_client: TestClient,
    sent_tasks,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    run = _create(cli, acme, tmp_path, "--set", "training.batch_size=2", "--set", "params.dropout=0.1")
    assert run.code == 0, run.err
    job_id = run.out.strip()
    assert sent_tasks.train == [job_id]
    job = api_client.get(f"/v1/jobs/{job_id}", headers=acme.headers).json()
    assert (
        job["params"]["method"] == "lora" and job["params"]["rank"] == 8 and job["params"]["dropout"] == 0.1
    )
    assert (job["training"]["max_steps"], job["training"]["batch_size"]) == (2, 2)
    assert job["training"]["learning_rate"] == pytest.approx(1e-3)

    # A whole job document in one file works too, and its method needs no flag.
    document = write_yaml(
        tmp_path / "job.yaml",
        f"base_model: tiny-sd\ndataset_id: {acme.dataset_id}\nparams:\n  method: lora\n  rank: 2\n"
        "training:\n  max_steps: 5\n",
    )
    run = cli("jobs", "create", "--params", str(document))
    assert run.code == 0, run.err
    assert api_client.get(f"/v1/jobs/{run.out.strip()}", headers=acme.headers).json()["params"]["rank"] == 2

    listing = cli("jobs", "list", "--status", "queued")
    assert listing.code == 0 and job_id in listing.out and "lora" in listing.out
    assert json.loads(cli("jobs", "show", job_id).out)["id"] == job_id


def test_bad_params_print_the_problem_detail_and_exit_non_zero(
    cli,
    acme: ApiTenant,
    sent_tasks,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    run = _create(cli, acme, tmp_path, "--set", "params.rank=0")
    assert run.code == 1 and run.out == ""
    assert "/params/rank" in run.err and "invalid_request, HTTP 422" in run.err
    assert sent_tasks.train == []

    run = cli("jobs", "show", "job_does_not_exist")
    assert run.code == 1 and "no job with id 'job_does_not_exist' (job_not_found, HTTP 404)" in run.err
    run = cli("jobs", "create", "--method", "lora", "--dataset", acme.dataset_id)
    assert run.code == 2 and "missing --base-model" in run.err
    run = _create(cli, acme, tmp_path, "--set", "rank=8")
    assert run.code == 2 and "params.rank" in run.err


def test_without_a_key_or_a_server_the_error_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.delenv("ATELIER_API_KEY", raising=False)
    assert main(["jobs", "list"]) == 2
    assert "no API key" in capsys.readouterr().err
    # Options go before or after the command.
    assert main(["--api-key", "k", "jobs", "list", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "cannot talk to http://127.0.0.1:9" in err and "Traceback" not in err
    args = build_parser().parse_args(["--url", "http://a", "jobs", "list"])
    assert args.url == "http://a"


def _drive(settings: Settings, job_id: str, final: JobStatus, artifact_key: str | None = None) -> None:
    """What a worker does to a two-step job, at the pace the events stream polls."""
    time.sleep(0.3)
    with session_scope(settings.database_url) as session:
        attempt = jobs.claim(session=session, job_id=job_id, worker_id="w", lease_s=60)
        assert attempt == 1
        jobs.heartbeat(
            session=session, job_id=job_id, attempt=1, lease_s=60, step=1, loss=0.25, images_per_s=4
        )
    time.sleep(0.7)
    with session_scope(settings.database_url) as session:
        jobs.record_checkpoint(session=session, job_id=job_id, attempt=1, step=2, key="ckpt")
        jobs.heartbeat(
            session=session, job_id=job_id, attempt=1, lease_s=60, step=2, loss=0.125, images_per_s=4
        )
    time.sleep(0.7)
    artifact = None
    if artifact_key:
        manifest = {"primary": WEIGHTS, "files": [{"name": WEIGHTS}]}
        artifact = jobs.ArtifactRecord(storage_prefix=artifact_key, manifest=manifest)
    error = {} if final == JobStatus.succeeded else {"error_code": "out_of_memory", "error_message": "CUDA"}
    with session_scope(settings.database_url) as session:
        jobs.finish(session=session, job_id=job_id, attempt=1, status=final, artifact=artifact, **error)


def test_create_and_watch_follows_the_event_stream_to_the_artifact(
    cli,
    acme: ApiTenant,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    def start_worker(job_id: str) -> None:
        args = (api_settings, job_id, JobStatus.succeeded, f"jobs/{job_id}/attempt-1")
        threading.Thread(target=_drive, args=args, daemon=True).start()

    monkeypatch.setattr(api.routes.jobs, "send_train", start_worker)  # the "broker" starts it
    run = _create(cli, acme, tmp_path, "--watch")
    assert run.code == 0, run.err
    job_id, artifact_id = run.lines
    assert artifact_id.startswith("art_") and "polling" not in run.err
    assert "started (attempt 1)" in run.err and "checkpoint at step 2" in run.err
    assert "step 2/2" in run.err and "loss 0.1250" in run.err and "4.0 img/s" in run.err
    assert "\r" not in run.err  # stderr is no terminal here: one line per update, nothing redrawn
    assert run.err.rstrip().endswith(f"job {job_id} succeeded; artifact:")


def test_watch_falls_back_to_polling_and_a_failed_job_exits_1(
    cli,
    acme: ApiTenant,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    job_id = _create(cli, acme, tmp_path).out.strip()

    def no_stream(self, job_id: str, **_: Any):  # type: ignore[no-untyped-def]
        raise StreamUnavailable("text/html")
        yield

    monkeypatch.setattr(AtelierClient, "stream_events", no_stream)
    threading.Thread(target=_drive, args=(api_settings, job_id, JobStatus.failed), daemon=True).start()
    run = cli("jobs", "watch", job_id)
    assert run.code == 1 and run.out == ""
    assert "polling" in run.err and f"job {job_id} failed: out_of_memory: CUDA" in run.err


def test_cancel_then_watch_exits_3(cli, acme: ApiTenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_id = _create(cli, acme, tmp_path).out.strip()
    run = cli("jobs", "cancel", job_id)
    assert run.code == 0 and run.out.strip() == f"{job_id} canceled"
    assert cli("jobs", "watch", job_id).code == 3
    again = cli("jobs", "cancel", job_id)
    assert again.code == 1 and "job_finished" in again.err
    assert job_id in cli("jobs", "list", "--status", "canceled").out


# --- artifacts and generations -------------------------------------------------------------------


def _artifact(cli, tenant: ApiTenant, settings: Settings, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    job_id = _create(cli, tenant, tmp_path).out.strip()
    prefix = f"jobs/{job_id}/attempt-1"
    storage = make_storage(settings)
    storage.put_bytes(f"{prefix}/{WEIGHTS}", b"weights")
    storage.put_bytes(f"{prefix}/manifest.json", b"{}")
    manifest = {"primary": WEIGHTS, "files": [{"name": WEIGHTS}]}
    return succeed_with_artifact(settings.database_url, job_id, prefix=prefix, manifest=manifest)


def test_download_an_artifact(cli, acme: ApiTenant, api_settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifact_id = _artifact(cli, acme, api_settings, tmp_path)
    out = tmp_path / "downloads"  # made by the command: "-o downloads/" names a folder
    run = cli("artifacts", "download", artifact_id, "-o", f"{out}/")
    assert run.code == 0, run.err
    assert run.out.strip() == str(out / WEIGHTS) and (out / WEIGHTS).read_bytes() == b"weights"
    run = cli("artifacts", "download", artifact_id, "--all", "-o", str(tmp_path / "all"))
    assert run.code == 0, run.err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["manifest.json", WEIGHTS]

    run = cli("artifacts", "download", artifact_id, "--format", "ckpt", "-o", str(out))
    assert run.code == 1 and "format_not_supported" in run.err and "kohya" in run.err
    assert json.loads(cli("artifacts", "show", artifact_id).out)["method"] == "lora"
    assert artifact_id in cli("artifacts", "list").out


def test_generate_sends_local_images_inline_and_saves_the_pngs(
    cli,
    acme: ApiTenant,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    lora = _artifact(cli, acme, api_settings, tmp_path)
    storage = make_storage(api_settings)

    def worker(generation_id: str) -> None:
        # The generate worker's part: two PNGs under the tenant, the row succeeded.
        keys = [f"tenants/{acme.tenant_id}/generations/{generation_id}/{i}.png" for i in range(2)]
        for key in keys:
            storage.put_bytes(key, png_bytes(MAGENTA))
        with session_scope(api_settings.database_url) as session:
            row = session.get(Generation, generation_id)
            assert row is not None
            row.status, row.image_keys = JobStatus.succeeded, keys

    monkeypatch.setattr(api.routes.generations, "send_generate", worker)
    run = cli(
        "generate", "--base-model", "tiny-sd", "--prompt", "a photo of sks", "--lora", f"{lora}:0.5",
        "--steps", "2", "--seed", "7", "--num-images", "2", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert run.code == 0, run.err
    paths = [Path(p) for p in run.lines]
    assert len(paths) == 2 and all(Image.open(p).size == (32, 32) for p in paths)
    generation_id = paths[0].name.rsplit("-", 1)[0]
    with session_scope(api_settings.database_url) as session:
        spec = session.get(Generation, generation_id).spec
    assert spec["loras"] == [{"artifact_id": lora, "scale": 0.5}] and spec["seed"] == 7

    # An artifact of the wrong kind is the API's 422, printed with its pointer.
    run = cli("generate", "--base-model", "tiny-sd", "--prompt", "x", "--hypernetwork", lora)
    assert run.code == 1 and "/hypernetwork/artifact_id" in run.err and "artifact_incompatible" in run.err


# --- as users run it: a subprocess against `atelier serve` with its embedded worker ---------------


def _atelier(stack: Stack, key: str, *args: str, timeout: float = 600) -> Run:
    env = stack.env | {"ATELIER_URL": stack.base_url, "ATELIER_API_KEY": key}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.mark.services
@pytest.mark.slow
def test_cli_end_to_end_on_the_embedded_service(embedded_stack: Stack, tmp_path: Path) -> None:
    embedded_stack.env["ATELIER_TORCH_THREADS"] = "1"
    embedded_stack.start_api(with_worker=True)
    upgrade(embedded_stack.database_url)
    with session_scope(embedded_stack.database_url) as session:
        key = create_key(session=session, tenant_name="cli").secret
    upload = _atelier(
        embedded_stack, key, "datasets", "upload", str(make_folder(tmp_path / "photos", 4, conditioned=4))
    )
    assert upload.code == 0, upload.err
    dataset_id = upload.out.strip()

    params = write_yaml(tmp_path / "params.yaml", "rank: 4\nalpha: 4\n")
    training = write_yaml(tmp_path / "training.yaml", "max_steps: 3\nlearning_rate: 1.0e-3\nbatch_size: 2\n")
    create = ["jobs", "create", "--method", "lora", "--dataset", dataset_id, "--base-model", "tiny-sd"]
    started = time.monotonic()
    run = _atelier(
        embedded_stack, key, *create, "--params", str(params), "--training", str(training),
        "--set", "training.checkpoint_every=2", "--watch",
    )  # fmt: skip
    assert run.code == 0, (run.err, embedded_stack.log("worker"))
    job_id, artifact_id = run.lines
    # Three tiny steps end before the first heartbeat records a loss; the in-process test shows it.
    assert "3/3" in run.err and "checkpoint at step 2" in run.err
    assert f"succeeded: artifact {artifact_id}" in run.err
    print(f"train 3 steps with --watch: {time.monotonic() - started:.1f} s")

    download = _atelier(embedded_stack, key, "artifacts", "download", artifact_id, "-o", str(tmp_path))
    assert download.code == 0 and Path(download.out.strip()).name == WEIGHTS
    assert os.path.getsize(download.out.strip()) > 0

    started = time.monotonic()
    gen = _atelier(
        embedded_stack, key, "generate", "--base-model", "tiny-sd", "--prompt", "a photo of sks",
        "--lora", f"{artifact_id}:1.0", "--steps", "2", "--seed", "1", "-o", str(tmp_path / "images"),
    )  # fmt: skip
    assert gen.code == 0, (gen.err, embedded_stack.log("worker"))
    assert Image.open(gen.out.strip()).info.get("parameters")  # the server's PNG, saved as it came
    print(f"generate with the LoRA: {time.monotonic() - started:.1f} s")

    long_job = _atelier(embedded_stack, key, *create, "--set", "training.max_steps=5000")
    assert long_job.code == 0, long_job.err
    assert _atelier(embedded_stack, key, "jobs", "cancel", long_job.out.strip()).code == 0
    watched = _atelier(embedded_stack, key, "jobs", "watch", long_job.out.strip(), timeout=300)
    assert watched.code == 3 and "canceled" in watched.err
    listing = _atelier(embedded_stack, key, "jobs", "list")
    assert job_id in listing.out and long_job.out.strip() in listing.out


def test_webhook_flags_reach_the_job_request(
    cli,
    acme: ApiTenant,
    sent_tasks,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    # A private address is refused by the API: the flag reached the request body, and the user sees why.
    run = _create(cli, acme, tmp_path, "--webhook-url", "https://10.0.0.7/hook", "--webhook-events", "failed")
    assert run.code == 1 and "url_not_allowed" in run.err and "/webhook_url" in run.err, run.err
    run = _create(cli, acme, tmp_path, "--webhook-events", "failed")
    assert run.code == 1 and "/webhook_events" in run.err, run.err
    assert sent_tasks.train == []
