"""Artifacts: the manifest, and downloads (presigned redirect on S3, streamed on local storage)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.pagination import page
from api.routes.files import stream_file
from api.schemas import ArtifactPublic, ArtifactsPublic, DeletedPublic
from core import deletion
from core.errors import ApiError, not_found
from core.exports.formats import PRIMARY, UnknownFormat, resolve_format
from core.models import Artifact
from core.storage.artifacts import primary_files

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


def get_owned_artifact(session: SessionDep, tenant_id: str, artifact_id: str) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.tenant_id != tenant_id:
        raise not_found("artifact", artifact_id)
    return artifact


@router.get("", response_model=ArtifactsPublic)
def list_artifacts(
    session: SessionDep,
    tenant_id: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ArtifactsPublic:
    query = select(Artifact).where(Artifact.tenant_id == tenant_id)
    rows, more = page(session, query, Artifact.id, after=after, limit=limit)
    return ArtifactsPublic(data=[ArtifactPublic.from_row(a) for a in rows], has_more=more)


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, session: SessionDep, tenant_id: TenantDep) -> ArtifactPublic:
    return ArtifactPublic.from_row(get_owned_artifact(session, tenant_id, artifact_id))


@router.delete("/{artifact_id}", response_model=DeletedPublic)
def delete_artifact(
    artifact_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant_id: TenantDep
) -> DeletedPublic:
    """Delete the artifact's files, exports included; 409 while a queued or running generation
    uses it."""
    artifact = get_owned_artifact(session, tenant_id, artifact_id)
    deletion.delete_artifact(session=session, storage=storage, settings=settings, artifact=artifact)
    return DeletedPublic(id=artifact_id, object="artifact")


@router.get("/{artifact_id}/download")
def download_artifact(
    artifact_id: str,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    tenant_id: TenantDep,
    file: Annotated[
        str | None, Query(description="A file named in the manifest; default the primary")
    ] = None,
    format: Annotated[
        str,
        Query(
            description="diffusers (the primary files), or another tool's format: kohya/a1111/comfyui "
            "(LoRA, embeddings, hypernetworks), single_file (DreamBooth, ControlNet), bin (IP-Adapter)"
        ),
    ] = PRIMARY,
) -> Response:
    artifact = get_owned_artifact(session, tenant_id, artifact_id)
    try:
        canonical = resolve_format(artifact.method, format)
    except UnknownFormat as exc:
        raise ApiError(422, "format_not_supported", str(exc)) from exc
    names = _names(artifact, canonical)
    name = file or (names[0] if canonical != PRIMARY else artifact.manifest.get("primary") or names[0])
    if name not in names:
        raise ApiError(
            422,
            "file_not_in_artifact",
            f"{name!r} is not in artifact {artifact_id} ({canonical}); files: {names}",
        )
    key = f"{artifact.storage_prefix}/{name}"
    filename = name.rsplit("/", 1)[-1] if canonical != PRIMARY else name.replace("/", "_")
    url = storage.presigned_url(key, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return stream_file(storage, key, filename)


def _names(artifact: Artifact, format: str) -> list[str]:
    """The files of `format`: the primary files (and the manifest), or one export's files."""
    manifest = artifact.manifest
    if format == PRIMARY:
        return [f["name"] for f in primary_files(manifest)] + ["manifest.json"]
    names = manifest.get("exports", {}).get(format)
    if not names:
        reason = manifest.get("export_errors", {}).get(format) or "it was made before this export existed"
        raise ApiError(
            409, "export_not_available", f"artifact {artifact.id} has no {format} export: {reason}"
        )
    return list(names)
