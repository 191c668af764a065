"""POST /v1/datasets: upload, validate before any GPU time, report every accepted and rejected file."""

from __future__ import annotations

import io
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile
from PIL import Image
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.pagination import page
from api.routes.files import stream_file
from api.schemas import DatasetPublic, DatasetsPublic, DeletedPublic
from core import deletion
from core.datasets.ingest import CONDITIONING_FOLDER, IMAGES_FOLDER, MANIFEST, DatasetRejected, ingest_upload
from core.errors import ApiError, not_found
from core.ids import new_id
from core.models import Dataset, DatasetStatus
from core.tenants.limits import check_storage, tenant_limits

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic)
def create_dataset(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant_id: TenantDep,
    files: Annotated[
        list[UploadFile],
        File(
            description="A zip of images + same-name .txt captions (+ conditioning/ images for "
            "ControlNet), or the files themselves"
        ),
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> DatasetPublic:
    total = sum(f.size or 0 for f in files)
    if total > settings.max_upload_bytes:
        raise ApiError(
            413, "upload_too_large", f"upload is {total} bytes; the limit is {settings.max_upload_bytes}"
        )
    # Refused before anything is stored; the stored PNGs may differ in size from the upload, and
    # what they take is what counts from then on.
    limits = tenant_limits(session=session, settings=settings, tenant_id=tenant_id)
    check_storage(session=session, storage=storage, limits=limits, tenant_id=tenant_id, adding=total)
    dataset = Dataset(id=new_id("ds"), tenant_id=tenant_id, name=name, status=DatasetStatus.validating)
    dataset.storage_prefix = f"tenants/{tenant_id}/datasets/{dataset.id}"
    session.add(dataset)
    session.commit()
    try:
        report = ingest_upload(
            [(f.filename or "upload", f.file) for f in files],
            dataset_prefix=dataset.storage_prefix,
            storage=storage,
            settings=settings,
        )
    except DatasetRejected as exc:
        dataset.status = DatasetStatus.invalid
        dataset.error_code, dataset.error_message = exc.code, exc.detail
        dataset.report = {"rejected": exc.errors}
        session.commit()
        raise ApiError(
            exc.status, exc.code, f"dataset {dataset.id}: {exc.detail}", errors=exc.errors
        ) from exc
    dataset.status = DatasetStatus.ready
    dataset.image_count = len(report.accepted)
    dataset.stored_bytes = report.stored_bytes
    dataset.report = report.to_dict()
    session.commit()
    return DatasetPublic.from_row(dataset)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    tenant_id: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DatasetsPublic:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    rows, more = page(session, query, Dataset.id, after=after, limit=limit)
    return DatasetsPublic(data=[DatasetPublic.from_row(d) for d in rows], has_more=more)


def get_owned_dataset(session: SessionDep, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise not_found("dataset", dataset_id)
    return dataset


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant_id: TenantDep) -> DatasetPublic:
    return DatasetPublic.from_row(get_owned_dataset(session, tenant_id, dataset_id))


@router.get(
    "/{dataset_id}/images/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the stored (normalised) PNG"}},
)
def dataset_image(
    dataset_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant_id: TenantDep,
    index: Annotated[int, Path(ge=0, description="position in the report's `accepted` list")],
    size: Annotated[
        int | None, Query(ge=16, le=1024, description="a thumbnail fitting size x size, not the image")
    ] = None,
    conditioning: Annotated[bool, Query(description="the ControlNet conditioning image instead")] = False,
) -> Response:
    """One accepted image of the dataset, as stored for training; the dashboard shows thumbnails."""
    dataset = get_owned_dataset(session, tenant_id, dataset_id)
    key = _image_key(storage, dataset, index, conditioning) if dataset.status == DatasetStatus.ready else None
    if key is None:
        raise not_found("dataset_image", f"{dataset_id}/{index}{'?conditioning' if conditioning else ''}")
    if size is None:
        return stream_file(storage, key)
    with Image.open(io.BytesIO(storage.get_bytes(key)), formats=["PNG"]) as image:
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    # A ready dataset never changes: the browser may keep the thumbnail (for this key holder only).
    headers = {"Cache-Control": "private, max-age=86400"}
    return Response(buffer.getvalue(), media_type="image/png", headers=headers)


def _image_key(storage: StorageDep, dataset: Dataset, index: int, conditioning: bool) -> str | None:
    manifest = json.loads(storage.get_bytes(f"{dataset.storage_prefix}/{MANIFEST}"))
    items = manifest.get("items", [])
    if index >= len(items):
        return None
    key = items[index].get("conditioning") if conditioning else items[index].get("key")
    folder = CONDITIONING_FOLDER if conditioning else IMAGES_FOLDER
    # Keys come from our own manifest, but only this dataset's objects may ever be served.
    if not key or not key.startswith(f"{dataset.storage_prefix}/{folder}/") or ".." in key.split("/"):
        return None
    return key


@router.delete("/{dataset_id}", response_model=DeletedPublic)
def delete_dataset(
    dataset_id: str, session: SessionDep, storage: StorageDep, tenant_id: TenantDep
) -> DeletedPublic:
    """Delete the dataset and its files; 409 while a queued or running job trains on it. Finished
    jobs and their artifacts stay."""
    dataset = get_owned_dataset(session, tenant_id, dataset_id)
    deletion.delete_dataset(session=session, storage=storage, dataset=dataset)
    return DeletedPublic(id=dataset_id, object="dataset")
