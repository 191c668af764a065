"""POST /v1/images: an image for generations to use (ControlNet conditioning, IP-Adapter reference).

Validated and normalised like a dataset image and stored as PNG under the tenant; generations refer
to it by id. There is no database row: the object under the tenant's prefix is the image.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.files import file_url
from api.schemas import DeletedPublic, InputImagePublic
from core import deletion
from core.errors import ApiError, not_found
from core.generation.images import (
    FileProblem,
    ImageNotFound,
    image_exists,
    image_info,
    image_key,
    read_upload,
    store_image,
)

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.post("", status_code=201, response_model=InputImagePublic)
def upload_image(
    settings: SettingsDep,
    storage: StorageDep,
    tenant_id: TenantDep,
    file: Annotated[UploadFile, File(description="One PNG, JPEG or WEBP image")],
) -> InputImagePublic:
    name = file.filename or "upload"
    try:
        image = read_upload(file.file, settings=settings)
    except FileProblem as problem:
        raise ApiError(
            413 if problem.code == "upload_too_large" else 422,
            problem.code,
            f"{name}: {problem.reason}",
            errors=[{"file": name, "code": problem.code, "reason": problem.reason}],
        ) from None
    stored = store_image(image, tenant_id=tenant_id, storage=storage)
    return InputImagePublic(id=stored.id, width=stored.width, height=stored.height)


@router.get("/{image_id}", response_model=InputImagePublic)
def get_image(image_id: str, request: Request, storage: StorageDep, tenant_id: TenantDep) -> InputImagePublic:
    try:
        info = image_info(image_id, tenant_id, storage)
    except ImageNotFound:
        raise not_found("image", image_id) from None
    url = file_url(storage, image_key(tenant_id, image_id), request)
    return InputImagePublic(id=info.id, width=info.width, height=info.height, url=url)


@router.delete("/{image_id}", response_model=DeletedPublic)
def delete_image(
    image_id: str, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> DeletedPublic:
    """Delete an uploaded image; 409 image_in_use while a queued or running generation uses it."""
    if not image_exists(image_id, tenant_id, storage):
        raise not_found("image", image_id)
    deletion.delete_image(session=session, storage=storage, tenant_id=tenant_id, image_id=image_id)
    return DeletedPublic(id=image_id, object="image")
