"""The deployment's topology run as processes, since Docker cannot run here: the API and beat without
torch, two training workers (one job each at a time, a fresh process per job), one generation
worker, against PostgreSQL, Redis and the S3 server. docker-compose.yml itself is checked in
tests/test_topology_compose.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
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
from packaging.requirements import Requirement

from cli.client import AtelierClient
from cli.demo import make_dataset_zip
from tests.service_stack import Stack
from tests.test_topology_compose import API_IMAGE_EXTRAS

ROOT = Path(__file__).resolve().parent.parent


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
