"""API keys: `atelier keys create|list|revoke`, expiry, and refusal on the next request in every
API process (nothing caches a key)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from cli.main import main
from core.config import reset_settings
from core.db import session_scope
from core.models import ApiKey
from core.tenants.keys import KeyState, list_keys
from core.timeutil import utcnow
from tests.service_stack import Stack


def atelier(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def new_key(capsys: pytest.CaptureFixture[str], tenant: str, *extra: str) -> tuple[str, str]:
    """(key id, secret) made by `atelier keys create`."""
    code, out, err = atelier(capsys, "keys", "create", "--tenant", tenant, *extra)
    assert code == 0, err
    key_id = next(word.rstrip(",") for word in err.split() if word.startswith("key_"))
    return key_id, out.strip()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == code


@pytest.fixture
def shared_db(db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The settings' database is `db_url` (SQLite, then PostgreSQL), for the CLI and the apps."""
    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ATELIER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATELIER_DATABASE_URL", db_url)
    monkeypatch.setenv("ATELIER_BROKER_URL", "memory://")
    reset_settings()
    yield db_url
    reset_settings()


def test_a_revoked_key_is_refused_by_every_app_on_the_database(
    shared_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from api.main import create_app

    _, kept = new_key(capsys, "acme", "--name", "ci")
    leaked_id, leaked = new_key(capsys, "acme", "--name", "laptop")
    # Two API processes' apps over one database: each answers from the database, never a cache.
    with TestClient(create_app()) as first, TestClient(create_app()) as second:
        for app in (first, second):
            assert app.get("/v1/jobs", headers=auth(leaked)).status_code == 200
            assert app.get("/v1/jobs", headers=auth(kept)).status_code == 200

        code, out, err = atelier(capsys, "keys", "revoke", leaked_id)
        assert code == 0, err
        assert out.strip() == leaked_id and "revoked" in err

        for app in (first, second):
            assert_refused(app.get("/v1/jobs", headers=auth(leaked)), "api_key_revoked")
            assert app.get("/v1/jobs", headers=auth(kept)).status_code == 200

    # Revoking again keeps the first time; an unknown id is an error.
    with session_scope(shared_db) as session:
        first_time = session.get(ApiKey, leaked_id).revoked_at
    assert atelier(capsys, "keys", "revoke", leaked_id)[0] == 0
    with session_scope(shared_db) as session:
        assert session.get(ApiKey, leaked_id).revoked_at == first_time
    code, _, err = atelier(capsys, "keys", "revoke", "key_doesnotexist")
    assert code == 1 and "no API key" in err


def test_expired_keys_are_refused(shared_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    from api.main import create_app

    key_id, secret = new_key(capsys, "acme", "--expires-in", "30d")
    with session_scope(shared_db) as session:
        expires_at = session.get(ApiKey, key_id).expires_at
    assert abs(expires_at - (utcnow() + timedelta(days=30))) < timedelta(minutes=1)

    with TestClient(create_app()) as app:
        assert app.get("/v1/jobs", headers=auth(secret)).status_code == 200
        with session_scope(shared_db) as session:
            session.execute(
                update(ApiKey).where(ApiKey.id == key_id).values(expires_at=utcnow() - timedelta(seconds=1))
            )
        assert_refused(app.get("/v1/jobs", headers=auth(secret)), "api_key_expired")
        assert_refused(app.get("/v1/jobs", headers=auth(secret + "x")), "invalid_api_key")

    code, _, err = atelier(capsys, "keys", "create", "--tenant", "acme", "--expires-in", "soon")
    assert code == 2 and "30d" in err


def test_keys_list_shows_state_and_last_use(shared_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    from api.main import create_app

    used_id, used = new_key(capsys, "acme", "--name", "ci")
    revoked_id, _ = new_key(capsys, "acme")
    expired_id, _ = new_key(capsys, "acme", "--expires-in", "1h")
    other_id, _ = new_key(capsys, "globex")
    atelier(capsys, "keys", "revoke", revoked_id)
    with session_scope(shared_db) as session:
        session.execute(
            update(ApiKey).where(ApiKey.id == expired_id).values(expires_at=utcnow() - timedelta(hours=1))
        )
    with TestClient(create_app()) as app:
        assert app.get("/v1/jobs", headers=auth(used)).status_code == 200

    code, out, _ = atelier(capsys, "keys", "list", "--tenant", "acme")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["ID", "TENANT", "NAME", "STATE"]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {used_id, revoked_id, expired_id}  # globex's key is another tenant's
    assert " ci " in by_id[used_id] and " active " in by_id[used_id]
    assert " revoked " in by_id[revoked_id] and " expired " in by_id[expired_id]

    with session_scope(shared_db) as session:
        keys = {k.key_id: k for k in list_keys(session=session)}
    assert keys.keys() == {used_id, revoked_id, expired_id, other_id}  # no --tenant: every tenant
    assert keys[used_id].last_used_at is not None and keys[revoked_id].last_used_at is None
    assert keys[other_id].state is KeyState.active
    # By id as well as by name.
    assert other_id in atelier(capsys, "keys", "list", "--tenant", keys[other_id].tenant_id)[1]


def test_revocation_reaches_a_separate_api_process(
    embedded_stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`atelier serve` in its own process sees a revocation made by the CLI on its next request."""
    embedded_stack.start_api()
    # The CLI runs with the server's settings, as an operator does on the server's machine.
    for name, value in embedded_stack.env.items():
        if name.startswith("ATELIER_"):
            monkeypatch.setenv(name, value)
    reset_settings()
    try:
        key_id, secret = new_key(capsys, "acme")
        url = f"{embedded_stack.base_url}/v1/jobs"
        assert httpx.get(url, headers=auth(secret)).status_code == 200
        assert atelier(capsys, "keys", "revoke", key_id)[0] == 0
        assert_refused(httpx.get(url, headers=auth(secret)), "api_key_revoked")
    finally:
        reset_settings()
