"""Deleting what a tenant made: the row and every object in storage that came from it.

What each deletion takes with it (README, "Deleting"):

- a dataset: its images, captions and manifest. Refused while a queued or running job trains on
  it; finished jobs and their artifacts stay, their `dataset_id` becomes null.
- a job (finished only; cancel a live one first): its checkpoints, samples, the leftovers of failed
  attempts, its events and webhook deliveries, and the DreamBooth class images it generated or
  reused when no other job of the tenant used them. Its artifact stays, as a fine-tuned model
  outlives its fine-tuning job at OpenAI; the artifact's `job_id` becomes null.
- an artifact: every file (primary, exports, manifest), and the generate workers' copy in the
  model cache where this process can reach it. Refused while a queued or running generation
  uses it; the job's `artifact_id` becomes null.
- a generation (finished only): its images and the images it stored from data URIs.
- an image (POST /v1/images): the object. Refused while a queued or running generation uses it.

Objects go first, rows last: a storage failure leaves the row, and deleting again finishes the
work. Nothing else writes under a finished job's, a finished generation's or an artifact's prefix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, delete, select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import ApiError
from core.generation.images import generation_prefix, image_key
from core.generation.params import ArtifactRef, GenerationSpec
from core.models import (
    Artifact,
    Dataset,
    DatasetStatus,
    Generation,
    Job,
    JobEvent,
    JobStatus,
    WebhookDelivery,
)
from core.storage.artifacts import content_key, local_copy
from core.storage.base import Storage, StorageError
from core.storage.factory import make_storage
from core.storage.keys import cached_images_prefix, job_prefix
from core.timeutil import utcnow

ACTIVE = (JobStatus.queued, JobStatus.running)
CACHE_EVENT = "cached_images"


@contextmanager
def _storage(kind: str, ident: str) -> Iterator[None]:
    try:
        yield
    except StorageError as exc:
        raise ApiError(
            503,
            "storage_unavailable",
            f"could not delete the files of {kind} {ident} ({exc}); it is kept: delete it again",
            headers={"Retry-After": "30"},
        ) from exc


# --- datasets -----------------------------------------------------------------------------------


def delete_dataset(*, session: Session, storage: Storage, dataset: Dataset) -> None:
    # Marked first and committed, so no new job can start on it (jobs need a ready dataset) while
    # its files go; a deletion that fails half-way leaves it `deleting`, and deleting again resumes.
    previous = dataset.status
    dataset.status = DatasetStatus.deleting
    session.commit()
    active = session.scalar(select(Job.id).where(Job.dataset_id == dataset.id, Job.status.in_(ACTIVE)))
    if active is not None:
        dataset.status = previous
        session.commit()
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {dataset.id} is used by job {active}, which is queued or running; cancel it or "
            "wait for it to finish",
        )
    with _storage("dataset", dataset.id):
        storage.delete_prefix(dataset.storage_prefix)
    session.execute(update(Job).where(Job.dataset_id == dataset.id).values(dataset_id=None))
    session.delete(dataset)
    session.commit()


# --- jobs ---------------------------------------------------------------------------------------


def delete_job(*, session: Session, storage: Storage, job: Job) -> None:
    if not JobStatus(job.status).is_terminal:
        raise ApiError(
            409,
            "job_active",
            f"job {job.id} is {job.status}; cancel it (POST /v1/jobs/{job.id}/cancel) and delete it "
            "once it is canceled",
        )
    artifact_prefix = session.scalar(select(Artifact.storage_prefix).where(Artifact.job_id == job.id))
    cache_keys = _cache_keys(session.scalars(_cache_events().where(JobEvent.job_id == job.id)))
    with _storage("job", job.id):
        for key in storage.list(job_prefix(job.tenant_id, job.id)):
            if artifact_prefix is None or not key.startswith(artifact_prefix.rstrip("/") + "/"):
                storage.delete(key)
        others = session.scalars(
            _cache_events()
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.tenant_id == job.tenant_id, JobEvent.job_id != job.id)
        )
        for key in cache_keys - _cache_keys(others):
            storage.delete_prefix(cached_images_prefix(job.tenant_id, key))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id == job.id))
    session.execute(delete(JobEvent).where(JobEvent.job_id == job.id))
    session.execute(update(Artifact).where(Artifact.job_id == job.id).values(job_id=None))
    session.delete(job)
    session.commit()


def _cache_events() -> Select[tuple[dict[str, Any] | None]]:
    return select(JobEvent.data).where(JobEvent.type == CACHE_EVENT)


def _cache_keys(events: Iterable[dict[str, Any] | None]) -> set[str]:
    keys = {str((data or {}).get("key") or "") for data in events}
    # Keys are sha256 hex digests (core.methods.dreambooth.class_images_key); anything else is not
    # a cache this code made, and must never become part of a prefix to delete.
    return {key for key in keys if len(key) == 64 and all(c in "0123456789abcdef" for c in key)}


# --- artifacts ----------------------------------------------------------------------------------


def delete_artifact(*, session: Session, storage: Storage, settings: Settings, artifact: Artifact) -> None:
    user = _active_generation(session, artifact.tenant_id, lambda use: use.artifact_id == artifact.id)
    if user is not None:
        raise ApiError(
            409,
            "artifact_in_use",
            f"artifact {artifact.id} is used by generation {user}, which is queued or running",
        )
    with _storage("artifact", artifact.id):
        storage.delete_prefix(artifact.storage_prefix)
    session.execute(update(Job).where(Job.artifact_id == artifact.id).values(artifact_id=None))
    session.delete(artifact)
    session.commit()
    _forget_local_copy(session, settings, artifact)


def _forget_local_copy(session: Session, settings: Settings, artifact: Artifact) -> None:
    """The copy a generate worker keeps in the model cache, where this process reaches it (the
    embedded service, or a volume shared with the workers). A copy is per content: one that
    another artifact, of any tenant, has too stays."""
    assert settings.model_cache is not None
    local = local_copy(settings.model_cache, artifact.id, artifact.manifest)
    if not local.is_dir():
        return
    key = content_key(artifact.manifest)
    if key is not None and any(
        content_key(manifest) == key for manifest in session.scalars(select(Artifact.manifest))
    ):
        return
    shutil.rmtree(local, ignore_errors=True)


# --- generations and their images ---------------------------------------------------------------


def delete_generation(*, session: Session, storage: Storage, generation: Generation) -> None:
    if not JobStatus(generation.status).is_terminal:
        raise ApiError(
            409,
            "generation_active",
            f"generation {generation.id} is {generation.status}; delete it once it has finished",
        )
    # Its stored data URIs are its own, but their ids are visible and may have been reused since.
    for image_id in generation.input_image_ids or []:
        _refuse_image_in_use(session, generation.tenant_id, image_id)
    with _storage("generation", generation.id):
        storage.delete_prefix(generation_prefix(generation.tenant_id, generation.id))
        for image_id in generation.input_image_ids or []:
            storage.delete(image_key(generation.tenant_id, image_id))
    session.delete(generation)
    session.commit()


def delete_image(*, session: Session, storage: Storage, tenant_id: str, image_id: str) -> None:
    _refuse_image_in_use(session, tenant_id, image_id)
    with _storage("image", image_id):
        storage.delete(image_key(tenant_id, image_id))


def _refuse_image_in_use(session: Session, tenant_id: str, image_id: str) -> None:
    user = _active_generation(session, tenant_id, lambda use: use.image == image_id)
    if user is not None:
        raise ApiError(
            409, "image_in_use", f"image {image_id} is used by generation {user}, which is queued or running"
        )


def _active_generation(session: Session, tenant_id: str, uses: Callable[[ArtifactRef], bool]) -> str | None:
    """The id of a queued or running generation of the tenant with a use for which `uses` holds."""
    rows = session.execute(
        select(Generation.id, Generation.spec).where(
            Generation.tenant_id == tenant_id, Generation.status.in_(ACTIVE)
        )
    )
    for generation_id, spec in rows:
        refs: list[ArtifactRef] = GenerationSpec.model_validate(spec).uses()
        if any(uses(ref) for ref in refs):
            return generation_id
    return None


def reap_interrupted_uploads(*, session: Session, settings: Settings) -> list[str]:
    """Datasets still `validating` `dataset_upload_timeout_s` after their upload began: the API
    process storing them died mid-upload, so nothing will finish them. What was stored goes first,
    then the row turns `invalid` (`upload_interrupted`), never trainable, telling its owner to upload
    again; a storage failure leaves it for the next round. Returns the ids cleaned up."""
    cutoff = utcnow() - timedelta(seconds=settings.dataset_upload_timeout_s)
    stale = session.scalars(
        select(Dataset).where(Dataset.status == DatasetStatus.validating, Dataset.created_at < cutoff)
    ).all()
    if not stale:
        return []
    storage = make_storage(settings)  # built only when needed: S3 clients are costly
    cleaned = []
    for dataset in stale:
        storage.delete_prefix(dataset.storage_prefix + "/")
        result = session.execute(
            update(Dataset)
            .where(Dataset.id == dataset.id, Dataset.status == DatasetStatus.validating)
            .values(
                status=DatasetStatus.invalid,
                error_code="upload_interrupted",
                error_message="the upload was interrupted before it was stored; upload the files again",
            )
        )
        session.commit()
        if result.rowcount:
            cleaned.append(dataset.id)
    return cleaned
