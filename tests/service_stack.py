"""Runs Atelier as users do, as real processes: `atelier serve` and `atelier worker` subprocesses
against PostgreSQL, Redis and the S3 test server (full stack) or the embedded defaults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from cli.client import AtelierClient
from core.config import Settings
from core.db import session_scope, upgrade
from core.tenants.keys import create_key

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_HOST = "redis://127.0.0.1:6379"


def test_model_cache() -> str:
    return os.environ.get("ATELIER_TEST_MODEL_CACHE", "/tmp/atelier-test-models")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]
    home: Path
    base_url: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.env["ATELIER_DATABASE_URL"]

    def settings(self) -> Settings:
        return Settings(home=self.home, database_url=self.database_url)

    def _spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.home / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_api(
        self, *, with_worker: bool = False, extra_env: dict[str, str] | None = None, same_port: bool = False
    ) -> None:
        """`same_port`: where the API ran before (restarted after a kill, its clients unchanged)."""
        port = int(self.base_url.rsplit(":", 1)[1]) if same_port else free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        args = ["serve", "--port", str(port)] + ([] if with_worker else ["--no-worker"])
        self._spawn("api", *args, extra_env=extra_env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"API did not start:\n{self.log('api')}")

    def start_workers(self) -> subprocess.Popen:
        """A training worker (fresh process per job) and a generate+maintenance worker with beat,
        the production topology; returns the training worker."""
        self._spawn(
            "worker-generate",
            "worker",
            "--queues",
            "generate,maintenance",
            "--beat",
            "--max-tasks-per-child",
            "0",
        )
        return self._spawn("worker", "worker", "--queues", "train", "--max-tasks-per-child", "1")

    def start_train_worker(self, name: str) -> subprocess.Popen:
        """One GPU's training worker as docker-compose.yml runs it: one job at a time, a fresh
        process per job."""
        args = ("worker", "--queues", "train", "--concurrency", "1", "--max-tasks-per-child", "1")
        return self._spawn(name, *args)

    def start_worker(self, name: str, *, queues: str) -> subprocess.Popen:
        """One Celery worker on `queues`, one task at a time, its pool process kept across tasks (as
        the generate worker runs). With `start_beat` and a maintenance worker, any worker can be
        killed while the reaper goes on."""
        return self._spawn(
            name, "worker", "--queues", queues, "--concurrency", "1", "--max-tasks-per-child", "0"
        )

    def start_beat(self) -> subprocess.Popen:
        return self._spawn("beat", "beat")

    def start_topology(
        self, *, train_workers: int = 2, api_env: dict[str, str] | None = None
    ) -> dict[str, subprocess.Popen]:
        """docker-compose.yml's processes: the API, `train_workers` training workers (worker-train-1,
        -2, ...), a generate+maintenance worker, and beat on its own. `api_env` is added to the
        environment of the API and beat, the two roles of the torch-free image. Returns the
        training workers by name, once each is consuming."""
        self.start_api(extra_env=api_env)
        self._spawn("beat", "beat", extra_env=api_env)
        self._spawn(
            "worker-generate",
            *("worker", "--queues", "generate,maintenance", "--concurrency", "1"),
            *("--max-tasks-per-child", "0"),
        )
        trainers = {
            f"worker-train-{n}": self.start_train_worker(f"worker-train-{n}")
            for n in range(1, train_workers + 1)
        }
        for name in trainers:
            self.wait_consuming(name)
        return trainers

    def wait_consuming(self, name: str, timeout_s: float = 90) -> None:
        """Until the Celery worker logs that it is ready (connected, consuming its queues)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " ready." in self.log(name):
                return
            if self.processes[name].poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"{name} did not start:\n{self.log(name)}")

    def client(self, tenant: str = "acme") -> AtelierClient:
        upgrade(self.database_url)
        with session_scope(self.database_url) as session:
            secret = create_key(session=session, tenant_name=f"{tenant}-{uuid.uuid4().hex[:6]}").secret
        return AtelierClient(self.base_url, secret)

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update(
        ATELIER_HOME=str(home),
        ATELIER_MODEL_CACHE=test_model_cache(),
        # Short leases so a killed worker's job is reaped within seconds, not minutes.
        ATELIER_LEASE_S="6",
        ATELIER_HEARTBEAT_S="1",
        ATELIER_REAP_INTERVAL_S="1",
        ATELIER_QUEUED_REDISPATCH_S="30",
    )
    return env


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"atelier_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, emptied before and after."""
    url = f"{REDIS_HOST}/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def full_stack(tmp_path: Path, postgres_url: str, redis_url: str, s3_server) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    env = _base_env(tmp_path)
    env.update(
        ATELIER_DATABASE_URL=postgres_url,
        ATELIER_BROKER_URL=redis_url,
        ATELIER_STORAGE="s3",
        ATELIER_S3_ENDPOINT_URL=s3_server.endpoint_url,
        ATELIER_S3_BUCKET=f"e2e-{uuid.uuid4().hex[:8]}",
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
    )
    stack = Stack(env=env, home=tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def embedded_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(env=_base_env(tmp_path), home=tmp_path)
    stack.env["ATELIER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'atelier.db'}"
    try:
        yield stack
    finally:
        stack.stop()
