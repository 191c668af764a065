"""Webhooks: Standard Webhooks signatures, the SSRF guard, and at-least-once delivery from the outbox.

Deliveries go to a real HTTP server on 127.0.0.1 (allowed by ATELIER_WEBHOOK_ALLOW_HOSTS). The broker
is replaced by a recorder (`doorbell`), and the Celery task functions are called as a worker would
call them, so each test decides when messages arrive, are lost, or are re-sent by the beat. Database
tests run on SQLite and PostgreSQL (`db_url`). No torch: nothing here trains.
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
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

import worker.app
import worker.tasks
from core.config import Settings, get_settings, reset_settings
from core.db import new_session, session_scope
from core.jobs import creation
from core.jobs import states as jobs
from core.models import Job, JobStatus, WebhookDelivery
from core.timeutil import utcnow
from core.webhooks import delivery as webhook_delivery
from core.webhooks import events as webhooks
from core.webhooks import url_guard
from core.webhooks.events import WebhookTarget
from core.webhooks.url_guard import UrlNotAllowed, check_url
from tests.db_fixtures import ApiTenant, insert_dataset, lora_spec, make_tenant

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


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The specification's published vector: any Standard Webhooks library verifies our deliveries.
    signature = webhooks.sign(
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_independent_verifier_accepts_every_live_secret_and_nothing_else() -> None:
    current, previous, stranger = (webhooks.new_secret() for _ in range(3))
    assert current.startswith("whsec_") and len(base64.b64decode(current[6:])) == 32
    body = b'{"type":"job.succeeded"}'
    headers = webhooks.signed_headers(
        msg_id="msg_1", timestamp=int(time.time()), body=body, secrets=[current, previous]
    )
    assert verify(current, headers, body) and verify(previous, headers, body)
    assert not verify(stranger, headers, body)
    assert not verify(current, headers, body + b" ")
    assert not verify(current, {**headers, "webhook-id": "msg_2"}, body)
    assert not verify(current, headers, body, now=int(time.time()) + 3600)  # a replayed old delivery


# --- the SSRF guard --------------------------------------------------------------------------------

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


HOSTILE = [
    ("https://127.0.0.1/hook", "loopback"),
    ("https://localhost:8443/hook", "loopback"),
    ("https://10.1.2.3/", "private"),
    ("https://192.168.0.10/", "private"),
    ("https://172.16.5.4/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "link_local"),
    ("http://169.254.169.254/latest/meta-data/", "scheme"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback"),
    ("https://[::ffff:a9fe:a9fe]/", "link_local"),
    ("https://[::127.0.0.1]/", "loopback"),
    ("https://[64:ff9b::a00:1]/", "private"),  # NAT64 of 10.0.0.1
    ("https://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("https://[fe80::1]/", "link_local"),
    ("https://[fc00::1]/", "private"),
    ("https://[ff02::1]/", "multicast"),
    ("https://224.0.0.1/", "multicast"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://[::]/", "unspecified"),
    ("https://100.64.0.1/", "shared"),
    ("https://0x7f.1/", "numeric_host"),
    ("https://2130706433/", "numeric_host"),
    ("https://0177.0.0.1/", "numeric_host"),
    ("https://127.1/", "numeric_host"),
    ("https://0x7f000001/", "numeric_host"),
    ("https://internal.example.test/", "private"),
    ("https://metadata.example.test/", "link_local"),
    ("https://mixed.example.test/", "private"),  # one private answer is enough
    ("https://nowhere.example.test/", "unresolvable"),
    ("http://hooks.example.test/", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://hooks.example.test/", "scheme"),
    ("https://user:pw@hooks.example.test/", "credentials"),
    ("https:///no-host", "invalid_url"),
    ("https://hooks.example.test/" + "a" * 2100, "too_long"),
]


@pytest.mark.parametrize(("url", "reason"), HOSTILE, ids=[u[:60] for u, _ in HOSTILE])
def test_hostile_urls_are_refused(fake_dns: dict, url: str, reason: str) -> None:
    with pytest.raises(UrlNotAllowed) as refused:
        check_url(url, allow_hosts=[])
    assert refused.value.reason == reason


def test_a_public_https_url_is_pinned_to_the_address_that_was_checked(fake_dns: dict) -> None:
    checked = check_url("https://Hooks.Example.Test:8443/in?x=1", allow_hosts=[])
    assert (checked.host, checked.port, str(checked.address)) == ("hooks.example.test", 8443, "93.184.216.34")
    assert checked.target == "https://93.184.216.34:8443/in?x=1"
    assert checked.host_header == "hooks.example.test:8443"


def test_the_allow_list_admits_exactly_the_hosts_it_names(fake_dns: dict) -> None:
    allow = ["127.0.0.1"]
    assert str(check_url("http://127.0.0.1:8080/x", allow_hosts=allow).address) == "127.0.0.1"
    for url, reason in [
        ("http://localhost:8080/x", "scheme"),  # listed by address, not by every name for it
        ("https://localhost:8080/x", "loopback"),
        ("http://0x7f.1:8080/x", "numeric_host"),
        ("http://127.0.0.2/", "scheme"),
        ("https://[::1]/", "loopback"),
    ]:
        with pytest.raises(UrlNotAllowed) as refused:
            check_url(url, allow_hosts=allow)
        assert refused.value.reason == reason, url
    # Names and networks, as a compose file would list them: a receiver container, a private subnet.
    allow = ["receiver", "10.0.0.0/8"]
    assert str(check_url("http://receiver:9000/", allow_hosts=allow).address) == "172.18.0.5"
    assert str(check_url("http://10.2.3.4/", allow_hosts=allow).address) == "10.2.3.4"
    with pytest.raises(UrlNotAllowed):
        check_url("https://internal.example.test/", allow_hosts=allow)  # resolving into 10/8 is not enough


def test_the_allow_list_setting_reads_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", "127.0.0.1, receiver")
    assert Settings().webhook_allow_hosts == ["127.0.0.1", "receiver"]
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", '["::1"]')
    assert Settings().webhook_allow_hosts == ["::1"]


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


def _webhook_env(monkeypatch: pytest.MonkeyPatch, home: Path, database_url: str) -> Settings:
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
    yield _webhook_env(monkeypatch, tmp_path / "home", db_url)
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


# --- delivery ------------------------------------------------------------------------------------


def test_a_jobs_lifecycle_reaches_the_receiver_signed_and_filtered(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    s = hook_settings
    tenant_id, job_id = new_job(s, receiver.url)  # default filter: started and the terminal events
    attempt = step(s, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    step(s, jobs.record_checkpoint, job_id=job_id, attempt=attempt, step=5, key="k/5")
    step(s, jobs.finish, job_id=job_id, attempt=attempt, status=JobStatus.failed, error_code="oom")
    assert doorbell.drain() == ["succeeded", "succeeded"]

    assert [r.json["type"] for r in receiver.requests] == ["job.started", "job.failed"]
    secret = tenant_secret(s, tenant_id)
    for request in receiver.requests:
        assert request.path == "/hooks/atelier"
        assert verify(secret, request.headers, request.body)
        assert request.headers["content-type"] == "application/json"
        assert request.json["data"]["id"] == job_id
    started, failed = (r.json for r in receiver.requests)
    assert (started["data"]["status"], started["data"]["attempt"]) == ("running", 1)
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["error"] == {"code": "oom", "message": None}
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 2
    rows = deliveries(s, job_id)
    assert [(r.event_type, r.status, r.attempts) for r in rows] == [
        ("job.started", "succeeded", 1),
        ("job.failed", "succeeded", 1),
    ]
    assert [r.id for r in rows] == [r.headers["webhook-id"] for r in receiver.requests]

    # An explicit filter: checkpoints only, so neither the start nor the cancel is sent.
    _, other = new_job(s, receiver.url, ["checkpoint"])
    attempt = step(s, jobs.claim, job_id=other, worker_id="w1", lease_s=60)
    step(s, jobs.record_checkpoint, job_id=other, attempt=attempt, step=5, key="k/5")
    step(s, jobs.finish, job_id=other, attempt=attempt, status=JobStatus.canceled)
    doorbell.drain()
    assert [r.json["type"] for r in receiver.requests[2:]] == ["job.checkpoint"]
    assert receiver.requests[2].json["data"]["checkpoint_step"] == 5

    # A job without a webhook leaves no outbox rows and rings nothing.
    _, quiet = new_job(s, None)
    step(s, jobs.claim, job_id=quiet, worker_id="w1", lease_s=60)
    assert deliveries(s, quiet) == [] and doorbell.sent == []


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_succeeds(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    receiver.script = [500, 503]
    tenant_id, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["pending", "pending", "succeeded"]

    assert len(receiver.requests) == 3
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1  # the same event, byte for byte
    secret = tenant_secret(hook_settings, tenant_id)
    assert all(verify(secret, r.headers, r.body) for r in receiver.requests)
    (row,) = deliveries(hook_settings, job_id)
    assert (row.id, row.status, row.attempts) == (receiver.requests[0].headers["webhook-id"], "succeeded", 3)
    assert [a["status_code"] for a in row.attempt_log] == [500, 503, 204]
    assert row.delivered_at is not None


def test_attempts_stop_at_the_limit_and_never_touch_the_job(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_WEBHOOK_MAX_ATTEMPTS", "3")
    reset_settings()
    receiver.script = [500] * 10
    _, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["pending", "pending", "failed"]
    (row,) = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 500)
    with new_session(hook_settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.attempt) == ("running", 1)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    settings = Settings(webhook_retry_base_s=5, webhook_retry_factor=4, webhook_retry_max_s=6 * 3600)
    low = [webhook_delivery.backoff_s(n, settings, rng=lambda: 0.0) for n in range(1, 10)]
    high = [webhook_delivery.backoff_s(n, settings, rng=lambda: 1.0) for n in range(1, 10)]
    assert low[:4] == [3.75, 15.0, 60.0, 240.0]
    assert high[:2] == [6.25, 25.0]
    assert max(high) == 6 * 3600 * 1.25 and high[-1] == high[-2]


def test_the_outbox_survives_a_broker_outage(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    doorbell.down = True
    _, job_id = new_job(hook_settings, receiver.url)
    # The event commits although its doorbell cannot ring.
    assert step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60) == 1
    (row,) = deliveries(hook_settings, job_id)
    assert (row.status, row.attempts) == ("pending", 0)
    assert worker.tasks.dispatch_webhooks() == {"due": [row.id], "sent": []}  # still down

    doorbell.down = False
    assert worker.tasks.dispatch_webhooks() == {"due": [row.id], "sent": [row.id]}
    assert doorbell.drain() == ["succeeded"]
    assert [r.headers["webhook-id"] for r in receiver.requests] == [row.id]
    assert worker.tasks.dispatch_webhooks() == {"due": [], "sent": []}
    # A doorbell that arrives twice (beat re-send racing the original) sends once.
    assert worker.tasks.deliver_webhook(row.id) == "skipped"
    assert len(receiver.requests) == 1


def test_an_attempt_whose_worker_died_is_taken_back(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell
) -> None:
    _, job_id = new_job(hook_settings, receiver.url, ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    (row,) = deliveries(hook_settings, job_id)
    doorbell.sent.clear()
    # As a worker killed mid-POST leaves it: claimed, lease run out, no result recorded.
    with session_scope(hook_settings.database_url) as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id)
            .values(status="sending", attempts=1, lease_expires_at=utcnow())
        )
    time.sleep(0.05)
    # The beat takes it back as a failed attempt, with the usual backoff; a later beat re-sends it.
    assert worker.tasks.dispatch_webhooks()["sent"] == []
    time.sleep(0.05)
    assert worker.tasks.dispatch_webhooks()["sent"] == [row.id]
    assert doorbell.drain() == ["succeeded"]
    (row,) = deliveries(hook_settings, job_id)
    assert row.attempts == 2
    assert row.attempt_log[0]["error"].startswith("interrupted")


def test_dns_rebinding_is_refused_at_delivery(
    hook_settings: Settings, receiver: Receiver, doorbell: Doorbell, fake_dns: dict
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"https://hooks.example.test:{port}/hooks"
    assert str(check_url(url, allow_hosts=hook_settings.webhook_allow_hosts).address) == "93.184.216.34"
    _, job_id = new_job(hook_settings, url, ["started"])
    fake_dns["hooks.example.test"] = ["127.0.0.1"]  # re-pointed after the job was accepted
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    delivery_id, _ = doorbell.sent.pop(0)
    assert worker.tasks.deliver_webhook(delivery_id) == "pending"
    (row,) = deliveries(hook_settings, job_id)
    assert row.last_error is not None and row.last_error.startswith("url_not_allowed")
    assert "127.0.0.1" in row.last_error and row.last_status_code is None
    assert receiver.requests == []


def test_https_goes_to_the_checked_address_and_verifies_the_certificate_for_the_name(
    hook_settings: Settings,
    doorbell: Doorbell,
    fake_dns: dict,
    tls_receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Development allow-list by name, so these names may resolve to 127.0.0.1.
    monkeypatch.setenv("ATELIER_WEBHOOK_ALLOW_HOSTS", "hooks.example.test,other.example.test")
    reset_settings()
    fake_dns.update({"hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    port = tls_receiver.url.split(":")[2].split("/")[0]
    _, job_id = new_job(hook_settings, f"https://hooks.example.test:{port}/in", ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    assert doorbell.drain() == ["succeeded"]
    (request,) = tls_receiver.requests
    assert (request.path, request.headers["host"]) == ("/in", f"hooks.example.test:{port}")

    # Same address, a name the certificate does not cover: TLS refuses, nothing is posted.
    _, job_id = new_job(hook_settings, f"https://other.example.test:{port}/in", ["started"])
    step(hook_settings, jobs.claim, job_id=job_id, worker_id="w1", lease_s=60)
    delivery_id, _ = doorbell.sent.pop(0)
    assert worker.tasks.deliver_webhook(delivery_id) == "pending"
    (row,) = deliveries(hook_settings, job_id)
    assert row.last_error is not None and "CERTIFICATE_VERIFY_FAILED" in row.last_error
    assert len(tls_receiver.requests) == 1


def test_a_rotated_secret_keeps_signing_until_its_grace_ends(hook_settings: Settings) -> None:
    tenant_id, _ = new_job(hook_settings, None)
    old = tenant_secret(hook_settings, tenant_id)
    with session_scope(hook_settings.database_url) as session:
        new = webhooks.rotate_secret(session=session, tenant_id=tenant_id, grace_s=3600).secret
    assert new != old
    with new_session(hook_settings.database_url) as session:
        assert webhooks.signing_secrets(session=session, tenant_id=tenant_id) == [new, old]
        later = utcnow() + timedelta(seconds=3601)
        assert webhooks.signing_secrets(session=session, tenant_id=tenant_id, now=later) == [new]


# --- the HTTP API (SQLite) ---------------------------------------------------------------------------


@pytest.fixture
def api_hooks(api_client: Any, api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The API test settings, plus the allow-list and fast retries."""
    return _webhook_env(monkeypatch, api_settings.home, api_settings.database_url)


def _create(client: Any, tenant: ApiTenant, key: str | None = None, **webhook: Any) -> Any:
    body = {
        "base_model": "tiny-sd",
        "dataset_id": tenant.dataset_id,
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 10},
        **webhook,
    }
    headers = {**tenant.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/jobs", json=body, headers=headers)


@pytest.mark.parametrize(
    ("webhook", "pointer", "code"),
    [
        ({"webhook_url": "https://169.254.169.254/latest/meta-data/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "http://[::ffff:127.0.0.1]/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "http://2130706433/"}, "/webhook_url", "url_not_allowed"),
        ({"webhook_url": "file:///etc/passwd"}, "/webhook_url", "url_not_allowed"),
        (
            {"webhook_url": "https://x.test/", "webhook_events": ["exploded"]},
            "/webhook_events/0",
            "invalid_request",
        ),
        ({"webhook_url": "https://x.test/", "webhook_events": []}, "/webhook_events", "invalid_request"),
        ({"webhook_events": ["started"]}, "/webhook_events", "invalid_request"),
    ],
)
def test_the_api_refuses_bad_webhooks_naming_the_field(
    api_client: Any, api_hooks: Settings, acme: ApiTenant, webhook: dict, pointer: str, code: str
) -> None:
    response = _create(api_client, acme, **webhook)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert pointer in [e["pointer"] for e in problem["errors"]]


def test_webhooks_over_the_api(
    api_client: Any,
    api_hooks: Settings,
    acme: ApiTenant,
    globex: ApiTenant,
    receiver: Receiver,
    doorbell: Doorbell,
) -> None:
    receiver.script = [500]
    created = _create(api_client, acme, "run-1", webhook_url=receiver.url)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["webhook_url"] == receiver.url
    assert job["webhook_events"] == ["started", "succeeded", "failed", "canceled"]
    # The webhook is part of what an Idempotency-Key names.
    assert _create(api_client, acme, "run-1", webhook_url=receiver.url).status_code == 200
    changed = _create(api_client, acme, "run-1", webhook_url=receiver.url + "/other")
    assert (changed.status_code, changed.json()["code"]) == (422, "idempotency_key_reused")

    # The tenant reads the secret it verifies with; another tenant has its own.
    secret = api_client.get("/v1/webhook-secret", headers=acme.headers).json()
    assert secret["secret"].startswith("whsec_") and secret["previous_secret_expires_at"] is None
    assert api_client.get("/v1/webhook-secret", headers=globex.headers).json()["secret"] != secret["secret"]

    # A cancel of the queued job is an event the worker never sees: the API's commit rings for it.
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel", headers=acme.headers).status_code == 200
    assert doorbell.drain() == ["pending", "succeeded"]
    assert [r.json["type"] for r in receiver.requests] == ["job.canceled"] * 2
    assert all(verify(secret["secret"], r.headers, r.body) for r in receiver.requests)

    listed = api_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=acme.headers).json()
    (delivery,) = listed["data"]
    assert delivery["id"] == receiver.requests[0].headers["webhook-id"]
    assert (delivery["type"], delivery["status"], delivery["attempts"]) == ("job.canceled", "succeeded", 2)
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 204]
    hidden = api_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=globex.headers)
    assert hidden.status_code == 404

    rotated = api_client.post("/v1/webhook-secret/rotate", headers=acme.headers).json()
    assert rotated["secret"] != secret["secret"] and rotated["previous_secret_expires_at"] is not None
    assert api_client.get("/v1/webhook-secret", headers=acme.headers).json()["secret"] == rotated["secret"]
