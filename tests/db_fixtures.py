"""Database and API fixtures (a pytest plugin listed in conftest.py).

`db_url` runs a test twice: on SQLite in tmp_path and on a real PostgreSQL. Both schemas are built
by the Alembic migrations, never by `metadata.create_all`, so every test also proves the migrations.
PostgreSQL gets one fresh database per pytest session (dropped at the end) and its tables are
truncated before each test; an unreachable server is a failure, never a skip: CI must test it.

`api_client` is the FastAPI app in-process on SQLite and local storage, with the Celery senders
replaced by recorders (`sent_tasks`): the real queue is exercised by the end-to-end tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from core.config import Settings, get_settings, reset_settings
from core.db import get_engine, new_session, session_scope, upgrade
from core.ids import new_id
from core.jobs import states as jobs
from core.models import Dataset, DatasetStatus, JobStatus
from core.spec.job import JobSpec
from core.spec.methods import LoraParams
from core.spec.training import TrainingParams
from core.tenants.keys import NewKey, create_key

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A PostgreSQL database of this pytest session's own, migrated to head, dropped afterwards."""
    name = f"atelier_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_DSN} is unreachable; these tests need it: {exc}")
    url = PG_URL_TEMPLATE.format(name=name)
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _truncate_all(url: str) -> None:
    # The tables present, not the models': a table added by a newer migration is emptied as well.
    engine = get_engine(url)
    tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: SQLite in tmp_path, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'atelier.db'}"
        upgrade(url)
        yield url
        get_engine(url).dispose()  # the engine stays cached per URL; close its file handles
        return
    url = request.getfixturevalue("pg_database_url")
    # Upgrading again is a no-op on a migrated database, and repairs one a test downgraded.
    upgrade(url)
    _truncate_all(url)
    yield url


@pytest.fixture
def db_session(db_url: str) -> Iterator[Session]:
    session = new_session(db_url)
    try:
        yield session
    finally:
        session.close()


def make_tenant(session: Session, name: str | None = None) -> str:
    """A tenant with one API key; returns the tenant id."""
    return create_key(session=session, tenant_name=name or f"tenant-{uuid.uuid4().hex[:8]}").tenant_id


def insert_dataset(
    session: Session,
    tenant_id: str,
    *,
    status: str = DatasetStatus.ready,
    image_count: int = 5,
    names: list[str] | None = None,
) -> str:
    """A dataset row as ingestion leaves it (`names`: the files' names, "00.png"... by default);
    the upload itself is tested in test_datasets.py."""
    names = names or [f"{i:02d}.png" for i in range(image_count)]
    image_count = len(names)
    dataset_id = new_id("ds")
    session.add(
        Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            name="fixture",
            status=status,
            storage_prefix=f"tenants/{tenant_id}/datasets/{dataset_id}",
            image_count=image_count,
            # The shape ingestion writes (core.datasets.ingest.ValidationReport.to_dict), trimmed.
            report={
                "counts": {
                    "accepted": image_count,
                    "rejected": 0,
                    "captioned": image_count,
                    "conditioned": 0,
                },
                "accepted": [
                    {"name": name, "width": 32, "height": 32, "caption": "x", "conditioning": False}
                    for name in names
                ],
                "rejected": [],
            },
        )
    )
    session.commit()
    return dataset_id


def succeed_with_artifact(database_url: str, job_id: str, *, prefix: str, manifest: dict) -> str:
    """Run a queued job to success straight through core.jobs.states, as a worker would: the artifact id."""
    with session_scope(database_url) as session:
        attempt = jobs.claim(session=session, job_id=job_id, worker_id="w", lease_s=60)
        assert attempt == 1
        artifact_id = jobs.finish(
            session=session,
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.succeeded,
            artifact=jobs.ArtifactRecord(storage_prefix=prefix, manifest=manifest),
        )
    assert artifact_id is not None
    return artifact_id


def lora_spec(dataset_id: str, *, base_model: str = "tiny-sd", max_steps: int = 10) -> JobSpec:
    return JobSpec(
        base_model=base_model,
        dataset_id=dataset_id,
        params=LoraParams(rank=4),
        training=TrainingParams(max_steps=max_steps),
    )


# --- the HTTP API --------------------------------------------------------------------------------


@dataclass
class SentTasks:
    """Ids the API handed to the broker, in order."""

    train: list[str] = field(default_factory=list)
    generate: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ApiTenant:
    tenant_id: str
    key: NewKey
    dataset_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key.secret}"}


@pytest.fixture
def api_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings from a clean ATELIER_* environment: everything under tmp_path, SQLite, local storage."""
    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("ATELIER_HOME", str(home))
    monkeypatch.setenv("ATELIER_DATABASE_URL", f"sqlite:///{home / 'atelier.db'}")
    monkeypatch.setenv("ATELIER_STORAGE", "local")
    # Nothing is sent (see sent_tasks); an in-memory broker keeps a stray send from touching disk.
    monkeypatch.setenv("ATELIER_BROKER_URL", "memory://")
    reset_settings()
    yield get_settings()
    reset_settings()
    get_engine(f"sqlite:///{home / 'atelier.db'}").dispose()


@pytest.fixture
def sent_tasks(monkeypatch: pytest.MonkeyPatch) -> SentTasks:
    import api.routes.generations
    import api.routes.jobs

    sent = SentTasks()
    monkeypatch.setattr(api.routes.jobs, "send_train", sent.train.append)
    monkeypatch.setattr(api.routes.generations, "send_generate", sent.generate.append)
    return sent


@pytest.fixture
def api_client(api_settings: Settings, sent_tasks: SentTasks) -> Iterator[TestClient]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    # The context manager runs the lifespan, which applies the migrations as the server does.
    with TestClient(create_app()) as client:
        yield client


def make_api_tenant(
    settings: Settings,
    name: str | None = None,
    *,
    dataset_status: str = DatasetStatus.ready,
    image_count: int = 5,
) -> ApiTenant:
    """A tenant, its API key and one dataset (ready, 5 images unless told otherwise)."""
    with session_scope(settings.database_url) as session:
        key = create_key(session=session, tenant_name=name or f"tenant-{uuid.uuid4().hex[:8]}")
        dataset_id = insert_dataset(session, key.tenant_id, status=dataset_status, image_count=image_count)
    return ApiTenant(tenant_id=key.tenant_id, key=key, dataset_id=dataset_id)


# Two tenants with an API key each, for the API tests (acme owns things, globex must not see them).
@pytest.fixture
def acme(api_client: TestClient, api_settings: Settings) -> ApiTenant:
    return make_api_tenant(api_settings, "acme")


@pytest.fixture
def globex(api_client: TestClient, api_settings: Settings) -> ApiTenant:
    return make_api_tenant(api_settings, "globex")
