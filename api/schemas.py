"""What crosses the wire, named by role: *Create in, *Public out, *sPublic for lists."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from core.generation.params import GenerationSpec
from core.jobs.fitting import JobFit
from core.models import Artifact, Dataset, Generation, Job, JobEvent
from core.spec.job import JobSpec
from core.timeutil import iso
from core.training.phases import PHASES
from core.webhooks.events import DEFAULT_EVENTS, WebhookEvent, WebhookTarget
from core.webhooks.url_guard import MAX_URL_LENGTH

GenerationCreate = GenerationSpec


class JobCreate(JobSpec):
    """A job's spec, plus where to POST its events. The webhook is kept out of the stored spec."""

    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="https URL that receives signed job events (Standard Webhooks headers)",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        min_length=1,
        description=f"events to send; default {', '.join(DEFAULT_EVENTS)}",
    )

    def job_spec(self) -> JobSpec:
        return JobSpec(**{name: getattr(self, name) for name in JobSpec.model_fields})

    def webhook(self) -> WebhookTarget | None:
        return WebhookTarget.of(self.webhook_url, self.webhook_events) if self.webhook_url else None


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None
    images_per_s: float | None
    it_per_s: float | None
    eta_s: float | None
    phase: str | None = Field(
        default=None,
        description="What the running attempt is doing, in this order (a job skips those it does not "
        f"need): {', '.join(PHASES)}; null until the attempt reports its first phase",
    )
    phase_done: int | None = Field(
        default=None,
        description="Units of the phase done: files (downloading_base, uploading), models "
        "(loading_base), images (generating_class_images, caching_latents), optimizer steps "
        "(training), 0 or 1 (exporting)",
    )
    phase_total: int | None = Field(default=None, description="Units the phase has in all")


class ErrorInfo(BaseModel):
    code: str
    message: str | None


class JobPublic(BaseModel):
    id: str
    object: str = "job"
    status: str
    method: str
    base_model: str
    dataset_id: str | None  # null once the dataset is deleted
    params: dict[str, Any]
    training: dict[str, Any]
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    checkpoint_step: int | None
    error: ErrorInfo | None
    artifact_id: str | None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    memory: dict[str, Any] | None = Field(
        default=None,
        description="The memory plan: estimate (of the job as it trains), the largest training "
        "worker's capacity_bytes, whether it fits, and the changes that fit=auto made; "
        "null where the base's architecture is unknown to the API",
    )
    created_at: str | None
    started_at: str | None
    finished_at: str | None

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        training = job.spec.get("training", {})
        per_step = training.get("batch_size", 1) * training.get("gradient_accumulation_steps", 1)
        it_s = job.images_per_s / per_step if job.images_per_s else None
        remaining = max(job.total_steps - job.step, 0)
        eta = remaining / it_s if it_s and job.status == "running" else None
        return cls(
            id=job.id,
            status=job.status,
            method=job.method,
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            params=job.spec.get("params", {}),
            training=training,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            progress=Progress(
                step=job.step,
                total=job.total_steps,
                loss=job.loss,
                images_per_s=job.images_per_s,
                it_per_s=it_s,
                eta_s=eta,
                phase=job.phase,
                phase_done=job.phase_done,
                phase_total=job.phase_total,
            ),
            checkpoint_step=job.checkpoint_step,
            error=ErrorInfo(code=job.error_code, message=job.error_message) if job.error_code else None,
            artifact_id=job.artifact_id,
            webhook_url=job.webhook_url,
            webhook_events=job.webhook_events,
            memory=job.memory,
            created_at=iso(job.created_at),
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
        )


class JobPlanPublic(BaseModel):
    """`POST /v1/jobs?dry_run=true`: what creating the job would do, without creating it."""

    object: Literal["job_plan"] = "job_plan"
    fits: bool | None = Field(description="null: no training worker's memory is known; nothing checked")
    memory: dict[str, Any] | None = Field(description="The job's memory plan, as JobPublic.memory")
    suggested_changes: list[dict[str, Any]] = Field(
        description='When it does not fit: what training.fit "auto" would change (empty if nothing would)'
    )
    detail: str | None = Field(description="When it does not fit: why, and what would make it fit")
    spec: dict[str, Any] = Field(description="The job as it would train, after any changes")

    @classmethod
    def of(cls, fit: JobFit) -> JobPlanPublic:
        return cls(
            fits=fit.fits,
            memory=fit.memory,
            suggested_changes=fit.suggested_changes,
            detail=fit.detail,
            spec=fit.spec.model_dump(mode="json"),
        )


class JobsPublic(BaseModel):
    object: str = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    id: int
    type: str
    attempt: int
    data: dict[str, Any]
    created_at: str | None

    @classmethod
    def from_row(cls, event: JobEvent) -> EventPublic:
        return cls(
            id=event.id,
            type=event.type,
            attempt=event.attempt,
            data=event.data or {},
            created_at=iso(event.created_at),
        )


class EventsPublic(BaseModel):
    object: str = "list"
    data: list[EventPublic]
    has_more: bool


class DatasetPublic(BaseModel):
    id: str
    object: str = "dataset"
    name: str | None
    status: str
    image_count: int
    report: dict[str, Any] | None
    error: ErrorInfo | None
    created_at: str | None

    @classmethod
    def from_row(cls, ds: Dataset) -> DatasetPublic:
        return cls(
            id=ds.id,
            name=ds.name,
            status=ds.status,
            image_count=ds.image_count,
            report=ds.report,
            error=ErrorInfo(code=ds.error_code, message=ds.error_message) if ds.error_code else None,
            created_at=iso(ds.created_at),
        )


class DatasetsPublic(BaseModel):
    object: str = "list"
    data: list[DatasetPublic]
    has_more: bool


class ArtifactPublic(BaseModel):
    id: str
    object: str = "artifact"
    job_id: str | None  # null once the job is deleted (the artifact stays)
    method: str
    base_model: str
    manifest: dict[str, Any]
    created_at: str | None

    @classmethod
    def from_row(cls, art: Artifact) -> ArtifactPublic:
        return cls(
            id=art.id,
            job_id=art.job_id,
            method=art.method,
            base_model=art.base_model,
            manifest=art.manifest,
            created_at=iso(art.created_at),
        )


class ArtifactsPublic(BaseModel):
    object: str = "list"
    data: list[ArtifactPublic]
    has_more: bool


class ImagePublic(BaseModel):
    index: int
    url: str


class InputImagePublic(BaseModel):
    """An image uploaded for generations to use (ControlNet conditioning, IP-Adapter reference)."""

    id: str
    object: str = "image"
    width: int
    height: int
    url: str | None = None


class GenerationPublic(BaseModel):
    id: str
    object: str = "generation"
    status: str
    request: dict[str, Any]
    images: list[ImagePublic]
    error: ErrorInfo | None
    attempt: int = Field(description="attempts started; a worker lost mid-generation starts another")
    max_attempts: int
    cancel_requested: bool
    created_at: str | None
    started_at: str | None
    finished_at: str | None

    @classmethod
    def from_row(cls, gen: Generation, urls: list[str]) -> GenerationPublic:
        return cls(
            id=gen.id,
            status=gen.status,
            request=gen.spec,
            images=[ImagePublic(index=i, url=u) for i, u in enumerate(urls)],
            error=ErrorInfo(code=gen.error_code, message=gen.error_message) if gen.error_code else None,
            attempt=gen.attempt,
            max_attempts=gen.max_attempts,
            cancel_requested=gen.cancel_requested,
            created_at=iso(gen.created_at),
            started_at=iso(gen.started_at),
            finished_at=iso(gen.finished_at),
        )


class DeletedPublic(BaseModel):
    """What DELETE answers, as OpenAI's API does: which object is gone."""

    id: str
    object: str
    deleted: Literal[True] = True
