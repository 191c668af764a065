"""Sending outbox rows: claim, POST to the checked address, record the attempt, back off.

Each attempt claims its row with a compare-and-set UPDATE (pending and due → sending, attempts+1),
so a doorbell delivered twice, or a beat re-send racing a retry, sends once. Success is a 2xx
within the timeout; anything else is retried with jittered exponential backoff until
`webhook_max_attempts`, after which the row is failed. Delivery never changes the job.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import certifi
import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope
from core.models import WebhookDelivery, WebhookDeliveryStatus
from core.timeutil import iso, utcnow
from core.webhooks import events as webhooks
from core.webhooks import url_guard

log = logging.getLogger(__name__)
USER_AGENT = "Atelier-Webhooks/1"
MAX_LOGGED_ATTEMPTS = 20
# A retry message may run this much before its row is due (clocks of two workers differ a little).
CLOCK_SLACK_S = 1.0
Status = WebhookDeliveryStatus


@dataclass(frozen=True)
class SendResult:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    status: str  # the row's status afterwards, or "skipped" when this call did not own an attempt
    retry_in: float | None = None  # seconds until the next attempt is due


def backoff_s(attempt: int, settings: Settings, rng: Callable[[], float] = random.random) -> float:
    """Delay after failed attempt `attempt` (1-based): base·factor^(n-1), capped, ±25 % jitter so
    the deliveries that failed together during a receiver's outage do not all return together."""
    raw = settings.webhook_retry_base_s * settings.webhook_retry_factor ** (attempt - 1)
    return min(raw, settings.webhook_retry_max_s) * (0.75 + 0.5 * rng())


def _lease_s(settings: Settings) -> float:
    # httpx times connect, write and read separately: an attempt can take about three timeouts.
    return 4 * settings.webhook_timeout_s + 30


def claim(*, session: Session, delivery_id: str, settings: Settings, now: datetime) -> int | None:
    """pending and due → sending. Returns this attempt's number, or None when it is not ours."""
    row = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == Status.pending,
            WebhookDelivery.next_attempt_at <= now + timedelta(seconds=CLOCK_SLACK_S),
        )
        .values(
            status=Status.sending,
            attempts=WebhookDelivery.attempts + 1,
            lease_expires_at=now + timedelta(seconds=_lease_s(settings)),
        )
        .returning(WebhookDelivery.attempts)
    ).first()
    session.commit()
    return None if row is None else int(row[0])


def _tls_context() -> ssl.SSLContext:
    # httpx's default trust (certifi) plus a bundle named by SSL_CERT_FILE (a private CA in
    # development): trust_env is off below to keep proxies out, which would also drop that variable.
    context = ssl.create_default_context(cafile=certifi.where())
    extra = os.environ.get("SSL_CERT_FILE")
    if extra:
        context.load_verify_locations(cafile=extra)
    return context


def send(*, url: str, msg_id: str, body: bytes, secrets: list[str], settings: Settings) -> SendResult:
    """One signed POST to the address the guard checked just now; redirects are not followed."""
    started = time.monotonic()

    def result(status_code: int | None, error: str | None) -> SendResult:
        return SendResult(status_code, error, int((time.monotonic() - started) * 1000))

    try:
        # Checked again at every attempt: the name may resolve elsewhere now than at job creation.
        checked = url_guard.check_url(url, allow_hosts=settings.webhook_allow_hosts)
    except url_guard.UrlNotAllowed as exc:
        return result(None, f"url_not_allowed: {exc}")
    headers = webhooks.signed_headers(msg_id=msg_id, timestamp=int(time.time()), body=body, secrets=secrets)
    headers.update({"host": checked.host_header, "user-agent": USER_AGENT})
    try:
        # trust_env=False: a proxy from the environment would resolve the name again, unpinned.
        with (
            httpx.Client(
                timeout=settings.webhook_timeout_s,
                follow_redirects=False,
                trust_env=False,
                verify=_tls_context(),
            ) as client,
            client.stream(
                "POST",
                checked.target,
                content=body,
                headers=headers,
                # TLS is verified against the name in the URL while connecting to the checked address.
                extensions={"sni_hostname": checked.host},
            ) as response,
        ):
            code = response.status_code
    except httpx.HTTPError as exc:
        return result(None, f"{type(exc).__name__}: {exc}"[:500])
    return result(code, None if 200 <= code < 300 else f"HTTP {code}")


def record(
    *, session: Session, delivery_id: str, attempt: int, sent: SendResult, settings: Settings, now: datetime
) -> Outcome:
    """Write the attempt's result, fenced on (sending, attempt): a row the sweeper took back is left."""
    row = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if row is None:
        return Outcome(delivery_id, "skipped")
    entry = {
        "attempt": attempt,
        "at": iso(now),
        "status_code": sent.status_code,
        "error": sent.error,
        "duration_ms": sent.duration_ms,
    }
    values: dict[str, Any] = {
        "lease_expires_at": None,
        "last_status_code": sent.status_code,
        "last_error": sent.error,
        "attempt_log": [*(row.attempt_log or []), entry][-MAX_LOGGED_ATTEMPTS:],
    }
    retry_in = None
    if sent.ok:
        values.update(status=Status.succeeded, delivered_at=now)
    elif attempt >= settings.webhook_max_attempts:
        values.update(status=Status.failed)
    else:
        retry_in = backoff_s(attempt, settings)
        values.update(status=Status.pending, next_attempt_at=now + timedelta(seconds=retry_in))
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == Status.sending,
            WebhookDelivery.attempts == attempt,
        )
        .values(**values)
    )
    session.commit()
    if result.rowcount == 0:
        return Outcome(delivery_id, "skipped")
    return Outcome(delivery_id, values["status"], retry_in)


def deliver(*, delivery_id: str, settings: Settings) -> Outcome:
    """One attempt of one delivery, if it is due and nobody else holds it."""
    with session_scope(settings.database_url) as session:
        attempt = claim(session=session, delivery_id=delivery_id, settings=settings, now=utcnow())
        if attempt is None:
            return Outcome(delivery_id, "skipped")
        row = session.get(WebhookDelivery, delivery_id, populate_existing=True)
        assert row is not None
        url, body = row.url, row.payload.encode()
        # Signed with the secrets live at this attempt: a retry after a rotation uses the new one.
        secrets = webhooks.signing_secrets(session=session, tenant_id=row.tenant_id)
    sent = send(url=url, msg_id=delivery_id, body=body, secrets=secrets, settings=settings)
    with session_scope(settings.database_url) as session:
        outcome = record(
            session=session,
            delivery_id=delivery_id,
            attempt=attempt,
            sent=sent,
            settings=settings,
            now=utcnow(),
        )
    log.info(
        "webhook %s attempt %d: %s",
        delivery_id,
        attempt,
        sent.status_code or sent.error,
        extra={"delivery_id": delivery_id, "attempt": attempt, "outcome": outcome.status},
    )
    return outcome


def sweep(*, session: Session, settings: Settings, limit: int = 500) -> list[str]:
    """For the beat: take back attempts whose worker died mid-send, and list the deliveries that
    are overdue by more than `webhook_redispatch_s` (their doorbell was lost) to be sent again."""
    now = utcnow()
    stale = session.scalars(
        select(WebhookDelivery).where(
            WebhookDelivery.status == Status.sending, WebhookDelivery.lease_expires_at < now
        )
    ).all()
    for row in stale:
        interrupted = SendResult(None, "interrupted: the worker stopped during the attempt", 0)
        record(
            session=session,
            delivery_id=row.id,
            attempt=row.attempts,
            sent=interrupted,
            settings=settings,
            now=now,
        )
    cutoff = now - timedelta(seconds=settings.webhook_redispatch_s)
    due = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == Status.pending, WebhookDelivery.next_attempt_at <= cutoff)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return list(due)
