"""Webhooks: which job events are sent, how they are signed, and the outbox rows that carry them.

Signing follows Standard Webhooks (standardwebhooks.com): headers `webhook-id` (the delivery id,
the same on every retry, for the receiver to deduplicate), `webhook-timestamp` (unix seconds of
this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
with the base64-decoded part of the tenant's `whsec_...` secret. After a rotation the header carries
one signature per live secret, space-separated, so a receiver with either secret verifies.

Delivery is at-least-once: `enqueue` writes the outbox row in the transaction that records the job
event, so a broker outage loses nothing; once that transaction commits, the row's id is sent to
the maintenance queue (the doorbell), and the beat re-sends rows whose doorbell was lost.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import dispatch
from core.ids import new_id
from core.models import Job, JobEvent, WebhookDelivery, WebhookSecret
from core.timeutil import iso, utcnow

log = logging.getLogger(__name__)

WebhookEvent = Literal["started", "checkpoint", "succeeded", "failed", "canceled"]
EVENTS: tuple[str, ...] = get_args(WebhookEvent)
DEFAULT_EVENTS: tuple[str, ...] = ("started", "succeeded", "failed", "canceled")
SECRET_PREFIX = "whsec_"
_PENDING = "atelier.webhook_deliveries"  # Session.info key: ids to ring for once the commit lands


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    events: tuple[str, ...]

    @classmethod
    def of(cls, url: str, events: list[str] | None) -> WebhookTarget:
        # Canonical order, no duplicates: the same request always hashes the same (idempotency).
        chosen = set(events) if events else set(DEFAULT_EVENTS)
        return cls(url=url, events=tuple(e for e in EVENTS if e in chosen))

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}


# --- secrets -------------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def get_secret(*, session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's secret row, made (and committed) on first use: reading it, or a first delivery."""
    row = session.get(WebhookSecret, tenant_id, populate_existing=True)
    if row is not None:
        return row
    session.add(WebhookSecret(tenant_id=tenant_id, secret=new_secret()))
    try:
        session.commit()
    except IntegrityError:
        # Another request made it first; theirs is the secret.
        session.rollback()
    row = session.get(WebhookSecret, tenant_id, populate_existing=True)
    assert row is not None
    return row


def rotate_secret(*, session: Session, tenant_id: str, grace_s: float) -> WebhookSecret:
    """A new secret signs from now on; the old one signs too for `grace_s`, then stops."""
    get_secret(session=session, tenant_id=tenant_id)
    # Locked (on PostgreSQL) so that two rotations at once cannot both keep the same "previous".
    row = session.get(WebhookSecret, tenant_id, populate_existing=True, with_for_update=True)
    assert row is not None
    now = utcnow()
    row.previous_secret = row.secret
    row.previous_expires_at = now + timedelta(seconds=grace_s)
    row.secret = new_secret()
    row.rotated_at = now
    session.flush()
    return row


def signing_secrets(*, session: Session, tenant_id: str, now: datetime | None = None) -> list[str]:
    row = get_secret(session=session, tenant_id=tenant_id)
    now = now or utcnow()
    live = [row.secret]
    if row.previous_secret and row.previous_expires_at and row.previous_expires_at > now:
        live.append(row.previous_secret)
    return live


def sign(*, secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(*, msg_id: str, timestamp: int, body: bytes, secrets: list[str]) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            sign(secret=s, msg_id=msg_id, timestamp=timestamp, body=body) for s in secrets
        ),
        "content-type": "application/json",
    }


# --- the outbox ----------------------------------------------------------------------------------


def job_snapshot(job: Job) -> dict[str, Any]:
    """The job as the event left it, with JobPublic's field names (core does not import api/)."""
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "method": job.method,
        "base_model": job.base_model,
        "dataset_id": job.dataset_id,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "progress": {"step": job.step, "total": job.total_steps, "loss": job.loss},
        "checkpoint_step": job.checkpoint_step,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "artifact_id": job.artifact_id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def enqueue(*, session: Session, job_event: JobEvent) -> str | None:
    """Write the outbox row for a job event if the job's webhook asks for it; returns its id.

    Runs inside the caller's transaction, before its commit: the row and the event land together.
    """
    if job_event.type not in EVENTS:
        return None
    wanted = session.execute(
        select(Job.webhook_url, Job.webhook_events).where(Job.id == job_event.job_id)
    ).first()
    if wanted is None or not wanted.webhook_url or job_event.type not in (wanted.webhook_events or ()):
        return None
    session.flush()  # the event's id and timestamp, and the job row as this transaction left it
    job = session.get(Job, job_event.job_id, populate_existing=True)
    assert job is not None
    body = {
        "type": f"job.{job_event.type}",
        "timestamp": iso(job_event.created_at),
        "data": job_snapshot(job),
    }
    delivery = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        event_id=job_event.id,
        event_type=body["type"],
        url=job.webhook_url,
        payload=json.dumps(body, separators=(",", ":")),
        next_attempt_at=utcnow(),
        attempt_log=[],
    )
    session.add(delivery)
    session.info.setdefault(_PENDING, []).append(delivery.id)
    return delivery.id


@event.listens_for(Session, "after_commit")
def _ring(session: Session) -> None:
    ids = session.info.pop(_PENDING, None)
    if not ids:
        return
    for delivery_id in ids:
        try:
            dispatch.send_webhook(delivery_id)
        except Exception:
            # The row is committed: the beat's dispatcher re-sends it once it is overdue.
            log.warning(
                "could not reach the broker for webhook delivery %s; the beat re-sends it", delivery_id
            )


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(_PENDING, None)
