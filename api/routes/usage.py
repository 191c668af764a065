"""GET /v1/usage: what the calling tenant uses against each of its limits (core/tenants/limits.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from core.tenants.limits import job_counts, storage_bytes, tenant_limits
from core.tenants.rate_limit import WINDOW_S, limiter_for

router = APIRouter(prefix="/v1/usage", tags=["usage"])


class JobUsage(BaseModel):
    running: int
    queued: int


class StorageUsage(BaseModel):
    datasets: int
    artifacts: int
    total: int


class LimitsPublic(BaseModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_storage_bytes: int
    requests_per_minute: int


class RateWindow(BaseModel):
    limit: int
    used: int  # this key's requests in the current window, this one included
    remaining: int
    window_s: int
    reset_s: int  # seconds until the window ends and the count starts again


class UsagePublic(BaseModel):
    object: str = "usage"
    tenant_id: str
    jobs: JobUsage
    storage_bytes: StorageUsage
    limits: LimitsPublic
    rate: RateWindow


@router.get("", response_model=UsagePublic)
def get_usage(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant_id: TenantDep,
) -> UsagePublic:
    limits = tenant_limits(session=session, settings=settings, tenant_id=tenant_id)
    window = limiter_for(settings.rate_limit_redis).peek(request.state.key_id, limits.requests_per_minute)
    return UsagePublic(
        tenant_id=tenant_id,
        jobs=JobUsage(**job_counts(session=session, tenant_id=tenant_id)),
        storage_bytes=StorageUsage(**storage_bytes(session=session, storage=storage, tenant_id=tenant_id)),
        limits=LimitsPublic(**limits.as_dict()),
        rate=RateWindow(
            limit=window.limit,
            used=window.used,
            remaining=window.remaining,
            window_s=WINDOW_S,
            reset_s=window.reset_s,
        ),
    )
