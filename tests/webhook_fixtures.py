"""Webhook test fixtures: an independent verifier, a resolver the test controls, a receiver, a broker
stand-in and settings. Registered in tests/conftest.py (pytest_plugins), so the fixtures reach every
test_webhook_*.py file by name.

Deliveries go to a real HTTP server on 127.0.0.1 (allowed by ATELIER_WEBHOOK_ALLOW_HOSTS). The broker
is replaced by a recorder (`doorbell`), and the Celery task functions are called as a worker would
call them, so each test decides when messages arrive, are lost, or are re-sent by the beat. No torch:
nothing here trains.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import worker.app
import worker.tasks
from core.config import Settings, get_settings, reset_settings
from core.db import new_session, session_scope
from core.jobs import creation
from core.models import WebhookDelivery
from core.webhooks import events as webhooks
from core.webhooks import url_guard
from core.webhooks.events import WebhookTarget
from tests.db_fixtures import insert_dataset, lora_spec, make_tenant

# --- an independent Standard Webhooks verifier (standardwebhooks.com, "Verifying webhooks") ---------


def verify(secret: str, headers: dict[str, str], body: bytes, *, now: int | None = None) -> bool:
    """What a receiver runs: written from the specification, sharing no code with core.webhooks.events."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs((now or int(time.time())) - int(timestamp)) > 300:
        return False
    key = base64.b64decode(secret.split("_", 1)[1] if secret.startswith("whsec_") else secret)
    content = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


# --- a resolver the test controls -------------------------------------------------------------------

FAKE_DNS = {
    "internal.example.test": ["10.0.0.7"],
    "metadata.example.test": ["169.254.169.254"],
    "mixed.example.test": ["93.184.216.34", "10.0.0.7"],
    "hooks.example.test": ["93.184.216.34"],
    "receiver": ["172.18.0.5"],
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A resolver the test controls; `localhost` still goes to the machine's real resolver."""
    real = url_guard.resolve
    table = {name: list(addrs) for name, addrs in FAKE_DNS.items()}

    def resolve(host: str, port: int) -> list[Any]:
        if host == "localhost":
            return real(host, port)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in table[host]]

    monkeypatch.setattr(url_guard, "resolve", resolve)
    return table


# --- a receiver, a broker stand-in and settings ------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from `script` (then 204)."""

    url: str
    requests: list[Received] = field(default_factory=list)
    script: list[int] = field(default_factory=list)


def start_receiver(tls: ssl.SSLContext | None = None) -> tuple[Receiver, ThreadingHTTPServer]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append(Received(self.path, headers, body))
            self.send_response(state.script.pop(0) if state.script else 204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if tls else "http"
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/hooks/atelier"
    return state, server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state, server = start_receiver()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """An https receiver on 127.0.0.1 whose certificate names hooks.example.test, trusted through
    SSL_CERT_FILE as a private development CA would be."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"),
            *("-subj", "/CN=hooks.example.test", "-addext", "subjectAltName=DNS:hooks.example.test"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    state, server = start_receiver(context)
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class Doorbell:
    """Stands in for the broker: records what would be sent to the maintenance queue."""

    sent: list[tuple[str, float | None]] = field(default_factory=list)
    down: bool = False

    def __call__(self, delivery_id: str, countdown: float | None = None) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((delivery_id, countdown))

    def drain(self, limit: int = 50) -> list[str]:
        """Run every queued message as the maintenance worker would, retries included."""
        outcomes = []
        while self.sent:
            assert len(outcomes) < limit, "deliveries did not settle"
            delivery_id, countdown = self.sent.pop(0)
            time.sleep(min(countdown or 0, 1.0))
            outcomes.append(worker.tasks.deliver_webhook(delivery_id))
        return outcomes


@pytest.fixture
def doorbell(monkeypatch: pytest.MonkeyPatch) -> Doorbell:
    bell = Doorbell()
    monkeypatch.setattr(worker.app, "send_webhook", bell)
    monkeypatch.setattr(worker.tasks, "send_webhook", bell)
    return bell


def webhook_env(monkeypatch: pytest.MonkeyPatch, home: Path, database_url: str) -> Settings:
    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ATELIER_HOME", str(home))
    monkeypatch.setenv("ATELIER_DATABASE_URL", database_url)
    monkeypatch.setenv("ATELIER_BROKER_URL", "memory://")
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    # Retries due at once, and the beat treats any due delivery as overdue: tests set the pace.
    monkeypatch.setenv("ATELIER_WEBHOOK_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("ATELIER_WEBHOOK_RETRY_FACTOR", "1")
    monkeypatch.setenv("ATELIER_WEBHOOK_REDISPATCH_S", "0")
    monkeypatch.setenv("ATELIER_WEBHOOK_TIMEOUT_S", "5")
    reset_settings()
    return get_settings()


@pytest.fixture
def hook_settings(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings as the worker reads them (get_settings), on this test's database."""
    yield webhook_env(monkeypatch, tmp_path / "home", db_url)
    reset_settings()


def new_job(settings: Settings, url: str | None, events: list[str] | None = None) -> tuple[str, str]:
    """A queued job with a webhook; returns (tenant id, job id)."""
    with session_scope(settings.database_url) as session:
        tenant_id = make_tenant(session)
        job, _ = creation.create_job(
            session=session,
            tenant_id=tenant_id,
            spec=lora_spec(insert_dataset(session, tenant_id)),
            idempotency_key=None,
            max_attempts=3,
            webhook=WebhookTarget.of(url, events) if url else None,
        )
        return tenant_id, job.id


def step(settings: Settings, fn: Any, **kwargs: Any) -> Any:
    with session_scope(settings.database_url) as session:
        return fn(session=session, **kwargs)


def deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with new_session(settings.database_url) as session:
        query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        return list(session.scalars(query.order_by(WebhookDelivery.created_at, WebhookDelivery.id)))


def tenant_secret(settings: Settings, tenant_id: str) -> str:
    with new_session(settings.database_url) as session:
        return webhooks.get_secret(session=session, tenant_id=tenant_id).secret
