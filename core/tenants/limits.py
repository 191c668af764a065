"""Per-tenant limits: defaults in Settings, overrides in `tenant_limits`, and the checks that refuse
work over a quota with a stable problem+json code (design.md §10).

| limit | enforced | over it |
|---|---|---|
| running jobs | when a worker claims (core/jobs/scheduling.py) | the job waits queued, no error |
| queued jobs | POST /v1/jobs | 409 `queued_job_limit` |
| storage bytes (datasets + artifacts) | POST /v1/datasets, POST /v1/jobs | 403 `storage_quota_exceeded` |
| requests per minute per key | every authenticated request (tenants/rate_limit.py) | 429 `rate_limited` |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import ApiError
from core.models import Artifact, Dataset, DatasetStatus, Job, JobStatus, Tenant, TenantLimits
from core.storage.base import Storage

LIMIT_NAMES = ("max_running_jobs", "max_queued_jobs", "max_storage_bytes", "requests_per_minute")


@dataclass(frozen=True)
class Limits:
    max_running_jobs: int
    max_queued_jobs: int
    max_storage_bytes: int
    requests_per_minute: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_limits(settings: Settings) -> Limits:
    return Limits(
        max_running_jobs=settings.tenant_max_running_jobs,
        max_queued_jobs=settings.tenant_max_queued_jobs,
        max_storage_bytes=settings.tenant_max_storage_bytes,
        requests_per_minute=settings.tenant_requests_per_minute,
    )


def _merge(defaults: Limits, row: TenantLimits | None) -> Limits:
    if row is None:
        return defaults
    values = {f.name: getattr(row, f.name) for f in fields(Limits)}
    return Limits(**{k: v if v is not None else getattr(defaults, k) for k, v in values.items()})


def tenant_limits(*, session: Session, settings: Settings, tenant_id: str) -> Limits:
    """The tenant's limits: its overrides where set, the settings' defaults elsewhere."""
    return _merge(default_limits(settings), session.get(TenantLimits, tenant_id))


def limits_of(*, session: Session, settings: Settings, tenant_ids: list[str]) -> dict[str, Limits]:
    defaults = default_limits(settings)
    rows = {
        row.tenant_id: row
        for row in session.scalars(select(TenantLimits).where(TenantLimits.tenant_id.in_(tenant_ids)))
    }
    return {t: _merge(defaults, rows.get(t)) for t in tenant_ids}


class TenantNotFound(LookupError):
    pass


def find_tenant(*, session: Session, tenant: str) -> Tenant:
    """A tenant by name or id."""
    row = session.scalar(select(Tenant).where((Tenant.name == tenant) | (Tenant.id == tenant)))
    if row is None:
        raise TenantNotFound(f"no tenant named {tenant!r} (tenants are made by `atelier keys create`)")
    return row


def set_overrides(*, session: Session, tenant_id: str, values: dict[str, int | None]) -> TenantLimits:
    """Set (an int) or clear (None, back to the default) the named overrides; others stay."""
    unknown = set(values) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (clear it to use the default)")
    row = session.get(TenantLimits, tenant_id)
    if row is None:
        row = TenantLimits(tenant_id=tenant_id)
        session.add(row)
    for name, value in values.items():
        setattr(row, name, value)
    session.commit()
    return row


def overrides_of(*, session: Session, tenant_id: str) -> dict[str, int]:
    row = session.get(TenantLimits, tenant_id)
    if row is None:
        return {}
    return {name: getattr(row, name) for name in LIMIT_NAMES if getattr(row, name) is not None}


# --- usage -----------------------------------------------------------------------------------------


def job_counts(*, session: Session, tenant_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.tenant_id == tenant_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
        .group_by(Job.status)
    )
    counts = {str(status): int(n) for status, n in rows}
    return {"running": counts.get(JobStatus.running, 0), "queued": counts.get(JobStatus.queued, 0)}


def manifest_bytes(manifest: dict[str, Any]) -> int:
    files = manifest.get("files") or []
    entries = files.values() if isinstance(files, dict) else files
    return sum(int(entry.get("bytes") or 0) for entry in entries if isinstance(entry, dict))


def storage_bytes(*, session: Session, storage: Storage | None, tenant_id: str) -> dict[str, int]:
    """Bytes the tenant's datasets and artifacts take. A dataset stored before sizes were recorded
    is measured in storage once and the figure kept."""
    datasets = 0
    for dataset in session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.status == DatasetStatus.ready)
    ):
        if dataset.stored_bytes is None and storage is not None:
            measured = sum(storage.size(key) for key in storage.list(dataset.storage_prefix + "/"))
            session.execute(update(Dataset).where(Dataset.id == dataset.id).values(stored_bytes=measured))
            session.commit()
            dataset.stored_bytes = measured
        datasets += dataset.stored_bytes or 0
    artifacts = sum(
        manifest_bytes(manifest or {})
        for manifest in session.scalars(select(Artifact.manifest).where(Artifact.tenant_id == tenant_id))
    )
    return {"datasets": datasets, "artifacts": artifacts, "total": datasets + artifacts}


# --- checks ----------------------------------------------------------------------------------------


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this tenant's quota checks until the transaction ends (PostgreSQL: a row lock on
    the tenant; SQLite has one writer at a time anyway), so two requests cannot both pass a check
    that only one of them fits."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def check_queued(*, session: Session, limits: Limits, tenant_id: str) -> None:
    """Before queueing one more job. Call under lock_tenant, in the transaction that inserts it."""
    queued = job_counts(session=session, tenant_id=tenant_id)["queued"]
    if queued >= limits.max_queued_jobs:
        session.rollback()
        raise ApiError(
            409,
            "queued_job_limit",
            f"this tenant has {queued} queued jobs, its limit; wait for some to start or cancel some",
            extensions={"limit": limits.max_queued_jobs, "queued": queued},
        )


def check_storage(
    *, session: Session, storage: Storage | None, limits: Limits, tenant_id: str, adding: int = 0
) -> None:
    """Refuse new bytes (`adding`, or a job whose artifact will add some) once the quota is used."""
    used = storage_bytes(session=session, storage=storage, tenant_id=tenant_id)["total"]
    if used + adding > limits.max_storage_bytes or used >= limits.max_storage_bytes:
        raise ApiError(
            403,
            "storage_quota_exceeded",
            f"this tenant stores {used} bytes of datasets and artifacts"
            + (f"; {adding} more" if adding else "")
            + f" would exceed its quota of {limits.max_storage_bytes}; delete some to make room",
            extensions={"limit": limits.max_storage_bytes, "used": used, "adding": adding},
        )
