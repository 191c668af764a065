"""Webhooks: the tenant's signing secret (read, rotate) and each job's delivery attempts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, TenantDep
from api.pagination import page
from api.routes.jobs import get_owned_job
from core.models import WebhookDelivery, WebhookDeliveryStatus, WebhookSecret
from core.timeutil import iso
from core.webhooks import events as webhooks

router = APIRouter(tags=["webhooks"])


class WebhookSecretPublic(BaseModel):
    object: str = "webhook_secret"
    secret: str
    # Until then deliveries are signed with the previous secret as well (a second v1 signature).
    previous_secret_expires_at: str | None
    created_at: str | None
    rotated_at: str | None

    @classmethod
    def from_row(cls, row: WebhookSecret) -> WebhookSecretPublic:
        return cls(
            secret=row.secret,
            previous_secret_expires_at=iso(row.previous_expires_at) if row.previous_secret else None,
            created_at=iso(row.created_at),
            rotated_at=iso(row.rotated_at),
        )


class WebhookDeliveryPublic(BaseModel):
    id: str  # the webhook-id header, the same on every attempt
    object: str = "webhook_delivery"
    job_id: str
    type: str
    url: str
    status: str
    attempts: int
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[dict[str, Any]]
    created_at: str | None
    delivered_at: str | None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> WebhookDeliveryPublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            type=row.event_type,
            url=row.url,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=iso(row.next_attempt_at) if row.status == WebhookDeliveryStatus.pending else None,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            attempt_log=row.attempt_log or [],
            created_at=iso(row.created_at),
            delivered_at=iso(row.delivered_at),
        )


class WebhookDeliveriesPublic(BaseModel):
    object: str = "list"
    data: list[WebhookDeliveryPublic]
    has_more: bool


@router.get("/v1/webhook-secret", response_model=WebhookSecretPublic)
def get_webhook_secret(session: SessionDep, tenant_id: TenantDep) -> WebhookSecretPublic:
    return WebhookSecretPublic.from_row(webhooks.get_secret(session=session, tenant_id=tenant_id))


@router.post("/v1/webhook-secret/rotate", response_model=WebhookSecretPublic)
def rotate_webhook_secret(
    session: SessionDep, settings: SettingsDep, tenant_id: TenantDep
) -> WebhookSecretPublic:
    row = webhooks.rotate_secret(
        session=session, tenant_id=tenant_id, grace_s=settings.webhook_secret_grace_s
    )
    session.commit()
    return WebhookSecretPublic.from_row(row)


@router.get("/v1/jobs/{job_id}/webhook-deliveries", response_model=WebhookDeliveriesPublic)
def job_webhook_deliveries(
    job_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> WebhookDeliveriesPublic:
    get_owned_job(session, tenant_id, job_id)
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    rows, more = page(session, query, WebhookDelivery.id, after=after, limit=limit)
    return WebhookDeliveriesPublic(data=[WebhookDeliveryPublic.from_row(r) for r in rows], has_more=more)
