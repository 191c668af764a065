"""Database rows. The job row is the source of truth; the queue is only a doorbell (design.md §4)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.timeutil import utcnow


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime()}


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class DatasetStatus(StrEnum):
    validating = "validating"
    ready = "ready"
    invalid = "invalid"
    deleting = "deleting"  # no new job may use it; a failed deletion is retried by deleting again


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantLimits(Base):
    """One tenant's overrides of the default limits in Settings (core/tenants/limits.py); NULL: default."""

    __tablename__ = "tenant_limits"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # Only a hash is kept: a leaked database does not leak usable keys.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))  # a label for people ("ci", "laptop")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    # Written at most once a minute per key (core/tenants/keys.py): a write per request would contend.
    last_used_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default=DatasetStatus.validating)
    storage_prefix: Mapped[str] = mapped_column(String(300))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    # What its objects take in storage, counted against the tenant's quota (core/tenants/limits.py); NULL
    # for a dataset stored before this was recorded, counted from storage when first needed.
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # The fair scheduler's "when did this tenant last start a job" (core/jobs/scheduling.py).
        Index("ix_jobs_tenant_started", "tenant_id", "started_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # NULL once the dataset is deleted (only a finished job outlives its dataset).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    method: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The attempt is the fencing token: every worker write names it, a stale worker's write matches 0 rows.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    # The attempt's current phase (core.training.phases.PHASES) and its done/total, in its units.
    phase: Mapped[str | None] = mapped_column(String(40))
    phase_done: Mapped[int | None] = mapped_column(Integer)
    phase_total: Mapped[int | None] = mapped_column(Integer)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    checkpoint_key: Mapped[str | None] = mapped_column(String(300))
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    artifact_id: Mapped[str | None] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Where the job's events are POSTed, and which ones (core/webhooks/events.py); checked at creation.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[Any] | None]
    # The memory plan the API made (core/jobs/fitting.py): estimate, worker capacity, changes made to fit.
    memory: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    type: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookSecret(Base):
    """A tenant's signing secret. Kept readable (HMAC needs it), unlike API keys; after a rotation
    the previous secret signs too until `previous_expires_at`, so receivers can switch without gaps."""

    __tablename__ = "webhook_secrets"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None]


class WebhookDeliveryStatus(StrEnum):
    pending = "pending"  # due at next_attempt_at
    sending = "sending"  # claimed by a worker until lease_expires_at
    succeeded = "succeeded"
    failed = "failed"  # attempts used up


class WebhookDelivery(Base):
    """The outbox: one row per (job event, job), written in the event's transaction. Its id is the
    `webhook-id` header, the same on every retry; `payload` is the exact body that is signed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("job_events.id"), unique=True)
    event_type: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default=WebhookDeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempt_log: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class Worker(Base):
    """A training worker's announcement of its device (core/jobs/workers.py), refreshed while it runs;
    the API plans jobs against the live ones."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid of the worker process
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(20))  # "cuda" | "cpu"
    device_name: Mapped[str] = mapped_column(String(200))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)  # the accelerator's (host RAM on a CPU)
    bitsandbytes: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # NULL once the job is deleted: an artifact outlives the job that trained it.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    method: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(200))
    storage_prefix: Mapped[str] = mapped_column(String(300))
    manifest: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(Base):
    """A generation row is a job's in small (core/generation/states.py): the same states, the attempt
    as fencing token, a lease its worker's heartbeat renews and the reaper takes back."""

    __tablename__ = "generations"
    __table_args__ = (Index("ix_generations_status_lease", "status", "lease_expires_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(200))
    image_keys: Mapped[list[Any] | None]
    # Images stored from the request's data URIs: this generation's own, deleted with it (images
    # uploaded to /v1/images are the tenant's, and stay).
    input_image_ids: Mapped[list[Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its message was last sent; the reaper re-sends a queued one whose message may be lost.
    dispatched_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
