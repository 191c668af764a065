"""POST /v1/generations: queue an image generation with a base model and trained artifacts."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.files import file_url
from api.routes.artifacts import get_owned_artifact
from api.schemas import DeletedPublic, GenerationCreate, GenerationPublic
from core import deletion
from core.bases.allow_list import BaseDescription, BaseModelNotAllowed, describe_base
from core.errors import ApiError, not_found
from core.generation import queue as generation_queue
from core.generation import states as generation_states
from core.generation.images import FileProblem, decode_data_uri, image_exists, image_key, store_image
from core.generation.params import ArtifactRef, is_data_uri
from core.ids import new_id
from core.models import Artifact, Generation, JobStatus
from core.spec.catalogue import GENERATION_USES
from core.storage.base import Storage, StorageError
from worker.app import send_generate

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/generations", tags=["generations"])


def _artifact_base(artifact: Artifact, settings: SettingsDep) -> BaseDescription:
    """The base an artifact was trained on, as its manifest records it; what the manifest lacks
    (written before family or architecture were recorded) is read from that base, if still allowed."""
    recorded = artifact.manifest.get("base_model") or {}
    family, architecture = recorded.get("family"), artifact.manifest.get("base_architecture")
    if family is None or architecture is None:
        try:
            known = describe_base(artifact.base_model, settings)
        except (BaseModelNotAllowed, ValueError):
            known = BaseDescription(artifact.base_model, None, None)
        family, architecture = family or known.family, architecture or known.architecture
    return BaseDescription(artifact.base_model, family, architecture)


def _describe(base: BaseDescription) -> str:
    arch = base.architecture
    parts = [f"family {base.family}" if base.family else "family unknown"]
    if arch:
        parts.append(f"cross-attention {arch.get('cross_attention_dim')}")
        parts.append("text encoders " + "+".join(str(w) for w in arch.get("text_widths") or []))
    return f"{base.id!r} ({', '.join(parts)})"


def _same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # Only what both record: a signature that grows later still matches older manifests.
    return all(a[key] == b[key] for key in a.keys() & b.keys())


def _misfit(artifact: BaseDescription, base: BaseDescription) -> str | None:
    """Why an artifact trained on `artifact` cannot be used on `base`, or None if it can: the same
    family and architecture (any SD 1.5 fine-tune for an SD 1.5 LoRA); where the request's base
    cannot be inspected, the same family; where even that is unknown, the same base id."""
    trained = f"was trained on {_describe(artifact)}, which does not fit {_describe(base)}"
    if artifact.family and base.family and artifact.family != base.family:
        return trained
    if artifact.architecture and base.architecture:
        if _same_architecture(artifact.architecture, base.architecture):
            return None
        return trained.replace("does not fit", "differs in architecture from")
    if artifact.id == base.id or (artifact.family and base.family):
        return None
    return f"was trained on {artifact.id!r}, not {base.id!r}, and the two cannot be compared here"


def _check_artifact(
    session: SessionDep, settings: SettingsDep, tenant_id: str, base: BaseDescription, use: ArtifactRef
) -> None:
    artifact = get_owned_artifact(session, tenant_id, use.artifact_id)
    if artifact.method != use.method:
        reason = f"artifact {artifact.id} is a {artifact.method}, not a {use.method}"
    elif (misfit := _misfit(_artifact_base(artifact, settings), base)) is not None:
        reason = f"artifact {artifact.id} {misfit}"
    else:
        return
    pointer = f"{use.pointer}/artifact_id"
    raise ApiError(
        422, "artifact_incompatible", f"{pointer}: {reason}", errors=[{"pointer": pointer, "message": reason}]
    )


def _check_image(
    settings: SettingsDep, storage: Storage, tenant_id: str, use: ArtifactRef
) -> Image.Image | None:
    """Check a use's image; a data URI comes back decoded, to be stored once every check passed."""
    pointer = f"{use.pointer}/image"
    if use.image is None:  # the schema requires one; this guards a spec built in code
        raise ApiError(422, "image_required", f"{pointer}: a {use.method} needs an image")
    if not is_data_uri(use.image):
        if not image_exists(use.image, tenant_id, storage):
            raise not_found("image", use.image)
        return None
    try:
        return decode_data_uri(use.image, settings=settings)
    except FileProblem as problem:
        raise ApiError(
            422,
            problem.code,
            f"{pointer}: {problem.reason}",
            errors=[{"pointer": pointer, "code": problem.code, "message": problem.reason}],
        ) from None


def _check(
    session: SessionDep, settings: SettingsDep, storage: Storage, tenant_id: str, body: GenerationCreate
) -> dict[str, Image.Image]:
    """Everything a worker would trip over, before queueing; returns the decoded data-URI images
    by the pointer of their use."""
    try:
        base = describe_base(body.base_model, settings)
    except BaseModelNotAllowed as exc:
        raise ApiError(422, "base_model_not_allowed", str(exc)) from exc
    uses = body.uses()
    for use in uses:
        _check_artifact(session, settings, tenant_id, base, use)
    decoded = {}
    for use in uses:
        if GENERATION_USES[use.method].image:
            image = _check_image(settings, storage, tenant_id, use)
            if image is not None:
                decoded[use.pointer] = image
    return decoded


def _store_images(storage: Storage, tenant_id: str, decoded: dict[str, Image.Image]) -> dict[str, str]:
    """Store decoded data URIs as images: the saved request holds ids, never megabytes of base64."""
    stored: dict[str, str] = {}
    try:
        for pointer, image in decoded.items():
            stored[pointer] = store_image(image, tenant_id=tenant_id, storage=storage).id
    except BaseException:
        for image_id in stored.values():
            try:
                storage.delete(image_key(tenant_id, image_id))
            except StorageError:
                log.warning("could not remove image %s after a failed store", image_id)
        raise
    return stored


@router.post("", status_code=201, response_model=GenerationPublic)
def create_generation(
    body: GenerationCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant_id: TenantDep,
) -> GenerationPublic:
    decoded = _check(session, settings, storage, tenant_id, body)
    stored = _store_images(storage, tenant_id, decoded) if decoded else {}
    spec = body.with_images(stored) if stored else body
    if spec.seed is None:
        # Drawn here, so the stored request (and each PNG) says how to make its images again.
        spec = spec.model_copy(update={"seed": secrets.randbelow(2**32 - spec.num_images)})
    generation = Generation(
        id=new_id("gen"),
        tenant_id=tenant_id,
        spec=spec.model_dump(mode="json"),
        status=JobStatus.queued,
        max_attempts=settings.generation_max_attempts,
        input_image_ids=list(stored.values()) or None,
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
    generation_queue.mark_dispatched(session=session, generation_id=generation.id)
    return GenerationPublic.from_row(generation, [])


def get_owned_generation(session: SessionDep, tenant_id: str, generation_id: str) -> Generation:
    generation = session.get(Generation, generation_id, populate_existing=True)
    if generation is None or generation.tenant_id != tenant_id:
        raise not_found("generation", generation_id)
    return generation


@router.get("/{generation_id}", response_model=GenerationPublic)
def get_generation(
    generation_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> GenerationPublic:
    generation = get_owned_generation(session, tenant_id, generation_id)
    urls = [file_url(storage, key, request) for key in generation.image_keys or []]
    return GenerationPublic.from_row(generation, urls)


@router.post("/{generation_id}/cancel", response_model=GenerationPublic)
def cancel_generation(
    generation_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> GenerationPublic:
    """A queued generation is canceled at once; a running one stops at its next denoising step after
    its worker's next heartbeat (`cancel_requested` says it was asked). 409 once it has finished."""
    generation = get_owned_generation(session, tenant_id, generation_id)
    if JobStatus(generation.status).is_terminal:
        raise ApiError(409, "generation_finished", f"generation {generation_id} already {generation.status}")
    generation = generation_states.request_cancel(session=session, generation=generation)
    urls = [file_url(storage, key, request) for key in generation.image_keys or []]
    return GenerationPublic.from_row(generation, urls)


@router.delete("/{generation_id}", response_model=DeletedPublic)
def delete_generation(
    generation_id: str, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> DeletedPublic:
    """Delete a finished generation's images, and the images it stored from data URIs; 409
    generation_active while it is queued or running."""
    generation = get_owned_generation(session, tenant_id, generation_id)
    deletion.delete_generation(session=session, storage=storage, generation=generation)
    return DeletedPublic(id=generation_id, object="generation")
