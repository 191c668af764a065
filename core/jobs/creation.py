"""Creating a job: a queued row, its first events, and the client's Idempotency-Key (design.md §4).

A retried create with the same key and body returns the job the first request created; the same key
with another body is a conflict, never a second GPU job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.ids import new_id
from core.jobs.states import add_event
from core.models import Job, JobStatus
from core.spec.job import JobSpec
from core.webhooks.events import WebhookTarget


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for job {job_id} with a different body")
        self.key = key
        self.job_id = job_id


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _request_body(spec: JobSpec, webhook: WebhookTarget | None) -> dict[str, Any]:
    body = spec.model_dump(mode="json")
    if body["training"]["fit"] == "off":
        # The default is left out, so a key used before training.fit existed still hashes the same.
        del body["training"]["fit"]
    if body["training"]["compile"] == "auto":
        del body["training"]["compile"]  # likewise for training.compile
    if webhook is not None:
        # Added only when present, so a key used before webhooks existed still hashes the same.
        body["webhook"] = webhook.as_dict()
    return body


def create_job(
    *,
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None,
    max_attempts: int,
    webhook: WebhookTarget | None = None,
    fitted: JobSpec | None = None,
    memory: dict[str, Any] | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; with a key already used, return that job (created=False) or raise.

    `spec` is the request as sent (what a replay is checked against); `fitted` what the job trains
    when the memory plan (`memory`, core/jobs/fitting.py) changed it; each change is recorded as a
    `fitted` event."""
    if idempotency_key is not None:
        existing = find_replay(
            session=session,
            tenant_id=tenant_id,
            spec=spec,
            idempotency_key=idempotency_key,
            webhook=webhook,
        )
        if existing is not None:
            return existing, False
    body_hash = request_hash(_request_body(spec, webhook))
    trains = fitted or spec
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        dataset_id=spec.dataset_id,
        method=spec.params.method,
        base_model=spec.base_model,
        spec=trains.model_dump(mode="json"),
        status=JobStatus.queued,
        max_attempts=max_attempts,
        total_steps=trains.training.max_steps,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        webhook_url=webhook.url if webhook else None,
        webhook_events=list(webhook.events) if webhook else None,
        memory=memory,
    )
    session.add(job)
    add_event(session=session, job_id=job.id, attempt=0, type="created")
    if memory and memory["changes"]:
        fit = {k: memory[k] for k in ("changes", "estimate", "capacity_bytes")}
        add_event(session=session, job_id=job.id, attempt=0, type="fitted", data=fit)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with one key raced; the loser replays the winner's job.
        session.rollback()
        existing = _find_by_key(session, tenant_id, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, idempotency_key or "", body_hash), False
    return job, True


def find_replay(
    *,
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str,
    webhook: WebhookTarget | None = None,
) -> Job | None:
    """The job an earlier request with this key created, checked against this body; None if new."""
    existing = _find_by_key(session, tenant_id, idempotency_key)
    if existing is None:
        return None
    return _replay(existing, idempotency_key, request_hash(_request_body(spec, webhook)))


def _find_by_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _replay(job: Job, key: str, body_hash: str) -> Job:
    if job.request_hash != body_hash:
        raise IdempotencyConflict(key, job.id)
    return job
