"""POST /v1/generations: queue an image generation with a base model and trained artifacts."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.files import file_url
from api.routes.artifacts import get_owned_artifact
from api.schemas import GenerationCreate, GenerationPublic
from core.base_models import BaseModelNotAllowed, get_base_model_info
from core.errors import ApiError, not_found
from core.ids import new_id
from core.models import Generation, JobStatus
from worker.app import send_generate

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/generations", tags=["generations"])


def _check(session: SessionDep, settings: SettingsDep, tenant_id: str, body: GenerationCreate) -> None:
    try:
        get_base_model_info(body.base_model, settings)
    except BaseModelNotAllowed as exc:
        raise ApiError(422, "base_model_not_allowed", str(exc)) from exc
    for ref in body.loras:
        artifact = get_owned_artifact(session, tenant_id, ref.artifact_id)
        if artifact.method != "lora":
            raise ApiError(
                422, "artifact_incompatible", f"artifact {artifact.id} is a {artifact.method}, not a lora"
            )
        if artifact.base_model != body.base_model:
            raise ApiError(
                422,
                "artifact_incompatible",
                f"artifact {artifact.id} was trained on {artifact.base_model!r}, not {body.base_model!r}",
            )


@router.post("", status_code=201, response_model=GenerationPublic)
def create_generation(
    body: GenerationCreate, session: SessionDep, settings: SettingsDep, tenant_id: TenantDep
) -> GenerationPublic:
    _check(session, settings, tenant_id, body)
    generation = Generation(
        id=new_id("gen"), tenant_id=tenant_id, spec=body.model_dump(mode="json"), status=JobStatus.queued
    )
    session.add(generation)
    session.commit()
    try:
        send_generate(generation.id)
    except Exception as exc:
        generation.status = JobStatus.failed
        generation.error_code, generation.error_message = "broker_unavailable", str(exc)
        session.commit()
        raise ApiError(503, "broker_unavailable", "the job queue is unreachable; try again") from exc
    return GenerationPublic.from_row(generation, [])


@router.get("/{generation_id}", response_model=GenerationPublic)
def get_generation(
    generation_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> GenerationPublic:
    generation = session.get(Generation, generation_id, populate_existing=True)
    if generation is None or generation.tenant_id != tenant_id:
        raise not_found("generation", generation_id)
    urls = [file_url(storage, key, request) for key in generation.image_keys or []]
    return GenerationPublic.from_row(generation, urls)
