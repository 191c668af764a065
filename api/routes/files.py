"""GET /v1/files/{key}: streams a stored file on local storage. Keys are tenant-scoped by prefix."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import StorageDep, TenantDep
from core.errors import not_found
from core.storage.base import ObjectNotFound

router = APIRouter(prefix="/v1/files", tags=["files"])

MEDIA_TYPES = {".png": "image/png", ".json": "application/json", ".safetensors": "application/octet-stream"}


def stream_file(storage: StorageDep, key: str, filename: str | None = None) -> StreamingResponse:
    try:
        size = storage.size(key)
    except (ObjectNotFound, ValueError):
        raise not_found("file", key) from None
    suffix = "." + key.rsplit(".", 1)[-1] if "." in key else ""
    headers = {"Content-Length": str(size)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        storage.iter_chunks(key),
        media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
        headers=headers,
    )


@router.get("/{key:path}", name="get_file")
def get_file(key: str, storage: StorageDep, tenant_id: TenantDep) -> StreamingResponse:
    # Only the tenant's own prefix is readable; anything else looks like it does not exist.
    if not key.startswith(f"tenants/{tenant_id}/"):
        raise not_found("file", key)
    return stream_file(storage, key)
