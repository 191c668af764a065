"""Training jobs: create (idempotent, memory-planned; or a dry run), list, get, cancel, events (JSON
and SSE), samples."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.files import file_url
from api.pagination import page
from api.routes.artifacts import get_owned_artifact
from api.routes.datasets import get_owned_dataset
from api.schemas import (
    DeletedPublic,
    EventPublic,
    EventsPublic,
    JobCreate,
    JobPlanPublic,
    JobPublic,
    JobsPublic,
)
from core import deletion
from core.bases.allow_list import BaseModelNotAllowed, get_base_model_info
from core.db import new_session
from core.errors import ApiError, not_found
from core.generation.images import image_exists
from core.jobs import creation
from core.jobs import states as jobs
from core.jobs.fitting import JobFit, plan_job
from core.methods.init_from import check_compatible
from core.models import DatasetStatus, Job, JobEvent, JobStatus
from core.spec.catalogue import CATALOGUE
from core.spec.job import JobSpec
from core.spec.methods import LoraParams
from core.tenants.limits import check_queued, check_storage, lock_tenant, tenant_limits
from core.webhooks import url_guard
from worker.app import send_train

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
KEEPALIVE_S = 15.0


def _check_init_from(session: SessionDep, storage: StorageDep, tenant_id: str, body: JobCreate) -> None:
    """The hyper_lora artifact and the reference images exist for this tenant, and the LoRA the
    job asks for is the one the hyper_lora predicts (base, rank, alpha, targets)."""
    init = body.init_from
    assert init is not None and isinstance(body.params, LoraParams)  # JobSpec's own check
    artifact = get_owned_artifact(session, tenant_id, init.hyper_lora)
    problems = check_compatible(
        {**artifact.manifest, "method": artifact.method, "base_model": artifact.base_model},
        base_model=body.base_model,
        lora=body.params,
    )
    if problems:
        raise ApiError(
            422,
            "artifact_incompatible",
            f"init_from.hyper_lora: artifact {artifact.id} cannot start this job: {'; '.join(problems)}",
            errors=[{"pointer": "/init_from/hyper_lora", "message": p} for p in problems],
        )
    for image_id in init.images:
        if not image_exists(image_id, tenant_id, storage):
            raise not_found("image", image_id)


def _check_inputs(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant_id: str, body: JobCreate
) -> None:
    try:
        get_base_model_info(body.base_model, settings)
    except BaseModelNotAllowed as exc:
        raise ApiError(422, "base_model_not_allowed", str(exc)) from exc
    if body.init_from is not None:
        _check_init_from(session, storage, tenant_id, body)
    if body.dataset_id is None:  # init_from's reference images are the training set
        return
    dataset = get_owned_dataset(session, tenant_id, body.dataset_id)
    if dataset.status != DatasetStatus.ready:
        raise ApiError(422, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}, not ready")
    method = body.params.method
    info = CATALOGUE[method]
    if dataset.image_count < info.min_images:
        # The kind names what counts: "dreambooth needs at least 3 instance images".
        kind = info.dataset_kind.replace("_", " ")
        noun = kind if info.min_images != 1 else kind.removesuffix("s")
        raise ApiError(
            422,
            "dataset_too_small",
            f"{method} needs at least {info.min_images} {noun}; dataset {dataset.id} has "
            f"{dataset.image_count}",
        )
    problems = body.params.dataset_problems(dataset.report or {})
    if problems:
        raise ApiError(
            422,
            "dataset_unsuitable",
            f"{method} cannot train on dataset {dataset.id}: {'; '.join(problems)}",
            errors=[{"pointer": "/dataset_id", "message": p} for p in problems],
        )


def _check_webhook(settings: SettingsDep, body: JobCreate) -> None:
    if body.webhook_events is not None and not body.webhook_url:
        message = "webhook_events needs a webhook_url"
        raise ApiError(
            422, "invalid_request", message, errors=[{"pointer": "/webhook_events", "message": message}]
        )
    if not body.webhook_url:
        return
    try:
        # Resolved here and again before every delivery (the name may be re-pointed in between).
        url_guard.check_url(body.webhook_url, allow_hosts=settings.webhook_allow_hosts)
    except url_guard.UrlNotAllowed as exc:
        raise ApiError(
            422,
            "url_not_allowed",
            f"webhook_url is not allowed: {exc}",
            errors=[{"pointer": "/webhook_url", "message": str(exc), "reason": exc.reason}],
        ) from exc


def _replayed(response: Response, job: Job) -> JobPublic:
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_row(job)


def _fit(session: SessionDep, settings: SettingsDep, spec: JobSpec) -> JobFit:
    """The memory plan; a job that fits no training worker (even fitted, with fit "auto") is refused."""
    fit = plan_job(spec=spec, settings=settings, session=session)
    if fit.fits is False:
        assert fit.memory is not None and fit.detail is not None
        raise ApiError(
            422,
            "job_does_not_fit",
            fit.detail,
            extensions={
                "estimate": fit.memory["estimate"],
                "capacity_bytes": fit.memory["capacity_bytes"],
                "reserve_bytes": fit.memory["reserve_bytes"],
                "suggested_changes": fit.suggested_changes,
            },
        )
    return fit


def _check_limits(session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant_id: str) -> None:
    """Storage quota (the job's artifact will add bytes), then the queued-jobs limit, checked under
    the tenant's lock, which create_job's commit releases: concurrent creates cannot overshoot it."""
    limits = tenant_limits(session=session, settings=settings, tenant_id=tenant_id)
    check_storage(session=session, storage=storage, limits=limits, tenant_id=tenant_id)
    lock_tenant(session, tenant_id)
    check_queued(session=session, limits=limits, tenant_id=tenant_id)


DRY_RUN = Query(
    description="Answer whether and how the job fits the training workers (200, a job_plan) "
    "without creating it; a job that does not fit answers fits: false, not 422"
)


@router.post("", status_code=201, response_model=JobPublic | JobPlanPublic)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    dry_run: Annotated[bool, DRY_RUN] = False,
) -> JobPublic | JobPlanPublic:
    spec, webhook = body.job_spec(), body.webhook()
    if dry_run:
        # Nothing is created, so an Idempotency-Key has nothing to replay or reserve.
        _check_inputs(session, settings, storage, tenant_id, body)
        _check_webhook(settings, body)
        response.status_code = 200
        return JobPlanPublic.of(plan_job(spec=spec, settings=settings, session=session))
    try:
        # A retried create answers with the job it made, even if its inputs changed since.
        if idempotency_key:
            replay = creation.find_replay(
                session=session,
                tenant_id=tenant_id,
                spec=spec,
                idempotency_key=idempotency_key,
                webhook=webhook,
            )
            if replay is not None:
                return _replayed(response, replay)
        _check_inputs(session, settings, storage, tenant_id, body)
        _check_webhook(settings, body)
        fit = _fit(session, settings, spec)
        _check_limits(session, settings, storage, tenant_id)
        job, created = creation.create_job(
            session=session,
            tenant_id=tenant_id,
            spec=spec,
            idempotency_key=idempotency_key,
            max_attempts=settings.max_attempts,
            webhook=webhook,
            fitted=fit.spec,
            memory=fit.memory,
        )
    except creation.IdempotencyConflict as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc)) from exc
    if not created:
        return _replayed(response, job)
    try:
        send_train(job.id)
        jobs.mark_dispatched(session=session, job_id=job.id)
    except Exception:
        # The row is committed: the beat re-sends queued jobs that were never dispatched.
        log.exception("could not reach the broker for job %s; the reaper will re-send it", job.id)
    return JobPublic.from_row(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> JobsPublic:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    rows, more = page(session, query, Job.id, after=after, limit=limit)
    return JobsPublic(data=[JobPublic.from_row(j) for j in rows], has_more=more)


def get_owned_job(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, tenant_id: TenantDep) -> JobPublic:
    return JobPublic.from_row(get_owned_job(session, tenant_id, job_id))


@router.delete("/{job_id}", response_model=DeletedPublic)
def delete_job(job_id: str, session: SessionDep, storage: StorageDep, tenant_id: TenantDep) -> DeletedPublic:
    """Delete a finished job: its checkpoints, samples and events (409 job_active while it is queued
    or running: cancel it first). Its artifact stays; delete it on its own."""
    deletion.delete_job(session=session, storage=storage, job=get_owned_job(session, tenant_id, job_id))
    return DeletedPublic(id=job_id, object="job")


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant_id: TenantDep) -> JobPublic:
    job = get_owned_job(session, tenant_id, job_id)
    if JobStatus(job.status).is_terminal:
        raise ApiError(409, "job_finished", f"job {job_id} already {job.status}")
    return JobPublic.from_row(jobs.request_cancel(session=session, job=job))


def _events_after(session: SessionDep, job_id: str, after: int, limit: int) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id).limit(limit)))


@router.get("/{job_id}/events", response_model=EventsPublic)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant_id: TenantDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):  # type: ignore[no-untyped-def]
    get_owned_job(session, tenant_id, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _stream(settings.database_url, job_id, after), media_type="text/event-stream"
        )
    rows = _events_after(session, job_id, after, limit + 1)
    return EventsPublic(data=[EventPublic.from_row(e) for e in rows[:limit]], has_more=len(rows) > limit)


async def _stream(database_url: str, job_id: str, after: int) -> AsyncIterator[str]:
    """Server-sent events: each job event, plus `progress` snapshots, until the job is terminal."""
    last_progress = None
    quiet_since = time.monotonic()
    while True:
        with new_session(database_url) as session:
            events = _events_after(session, job_id, after, 500)
            job = session.get(Job, job_id)
            assert job is not None
            snapshot = JobPublic.from_row(job).progress.model_dump()
            terminal = JobStatus(job.status).is_terminal
        sent = bool(events)
        for event in events:
            after = event.id
            payload = EventPublic.from_row(event).model_dump_json()
            yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n"
        if snapshot != last_progress:
            last_progress, sent = snapshot, True
            yield f"event: progress\ndata: {json.dumps(snapshot)}\n\n"
        if sent:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            # A comment line: clients ignore it, proxies see traffic and keep the stream open.
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if terminal and not events:
            return
        await asyncio.sleep(0.5)


@router.get("/{job_id}/samples")
def job_samples(
    job_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> dict:
    get_owned_job(session, tenant_id, job_id)
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "sample").order_by(JobEvent.id)
    )
    data = []
    for event in events:
        info = event.data or {}
        for image in info.get("images", []):
            data.append(
                {
                    "step": info.get("step"),
                    "attempt": event.attempt,
                    "prompt": image["prompt"],
                    "url": file_url(storage, image["key"], request),
                }
            )
    return {"object": "list", "data": data, "has_more": False}
