"""Settings, validated once at start and read through `get_settings()` (never at import time).

Two ways to run share these settings: the embedded default (SQLite, local storage, a filesystem
broker, everything under ATELIER_HOME) and the full stack (PostgreSQL, Redis, S3/MinIO), chosen by
setting `ATELIER_DATABASE_URL`, `ATELIER_BROKER_URL` and `ATELIER_STORAGE=s3`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.bases.architectures import KNOWN

# Built-in bases are made offline by core/tiny; anything else must be listed explicitly.
DEFAULT_BASE_MODELS: dict[str, str] = {
    "tiny-sd": "builtin:tiny-sd",
    "tiny-sdxl": "builtin:tiny-sdxl",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".atelier")
    database_url: str = ""  # default: sqlite under home
    broker_url: str = ""  # default: filesystem transport under home
    result_backend: str | None = None

    storage: Literal["local", "s3"] = "local"
    storage_root: Path | None = None  # local storage folder, default home/storage
    s3_bucket: str = "atelier"
    s3_endpoint_url: str | None = None
    # Where users' machines reach the same S3 server, for presigned download URLs (compose: the
    # services use http://minio:9000, a browser on the host http://localhost:9000). Default: the above.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_create_bucket: bool = True
    presign_ttl_s: int = 900

    model_cache: Path | None = None  # default home/models
    # id -> source: "builtin:<name>", "hf:<repo id>", a local diffusers folder, or "storage:<prefix>"
    base_models: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_BASE_MODELS))
    # IP-Adapter's frozen CLIP image encoder for bases that do not ship `image_encoder/` (real SD1.5
    # and SDXL): a local CLIPVisionModelWithProjection folder, e.g. h94/IP-Adapter's models/image_encoder.
    image_encoder: Path | None = None
    # Same-architecture fine-tunes the API cannot open (hf:, storage:): base id -> the name of a
    # known architecture (core.bases.architectures.KNOWN: sd15, sd21, sd21-base, sdxl), for memory
    # planning and compatibility checks without downloading anything.
    base_architectures: dict[str, str] = Field(default_factory=dict)

    # Memory planning (core/jobs/fitting.py): each class of training worker's accelerator memory in GiB
    # ("24,80"), for workers that may not be running now. Training workers also announce their
    # device (core/jobs/workers.py); the largest of both is what a job must fit. Neither: no check.
    train_worker_memory_gib: Annotated[list[float], NoDecode] = Field(default_factory=list)
    worker_announce_s: float = 60.0  # a training worker refreshes its announcement this often
    worker_live_s: float = 300.0  # an announcement not refreshed for this long no longer counts

    max_attempts: int = 3
    # Attempts a generation gets (core/generation/states.py): one whose worker died is re-queued by the
    # reaper until this many started, then fails `worker_lost`. Its lease and heartbeat are the jobs'.
    generation_max_attempts: int = Field(default=3, ge=1)
    lease_s: float = 60.0
    heartbeat_s: float = 5.0
    # A job's progress (its phase and done/total, its step) is written within this long of a change
    # and never more often: one row update per interval, however fast images or steps go by.
    progress_interval_s: float = Field(0.5, gt=0)
    job_time_limit_s: int = 24 * 3600
    queued_redispatch_s: float = 120.0  # a queued job older than this with no claim is re-sent
    reap_interval_s: float = 30.0
    # A trained artifact whose upload fails (S3 down) is retried, with backoff, this long before the
    # attempt gives up: waiting out an outage beats training again from the last checkpoint.
    artifact_upload_retry_s: float = 600.0
    # A dataset still `validating` this long after its upload began lost its API process mid-upload
    # (killed, redeployed): the reaper deletes what was stored and marks it `upload_interrupted`.
    # Keep it above the longest upload's validation (max_upload_bytes of images).
    dataset_upload_timeout_s: float = 3600.0
    # SIGTERM/SIGINT: a worker's running job stops at its next progress report (a few seconds) and is
    # handed back; a process still busy after this long is killed (its job handed back all the same).
    # Keep a container's stop grace period above it (docker-compose.yml stop_grace_period).
    shutdown_grace_s: float = 20.0

    # Webhooks (core/webhooks/events.py): retries back off base * factor^(n-1), jittered, capped; a delivery
    # fails for good after max attempts (about 20 hours with the defaults).
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 10
    webhook_retry_base_s: float = 5.0
    webhook_retry_factor: float = 4.0
    webhook_retry_max_s: float = 6 * 3600.0
    webhook_redispatch_s: float = 60.0  # a due delivery this overdue lost its message: the beat re-sends
    webhook_dispatch_interval_s: float = 15.0
    webhook_secret_grace_s: float = 24 * 3600.0  # a rotated-out secret still signs for this long

    # Per-tenant limits (core/tenants/limits.py), each overridable per tenant (`atelier tenants limits set`).
    # Running jobs are capped when a worker claims (the rest wait, fairly); queued jobs and storage
    # bytes (datasets + artifacts) when they are created; requests per minute per API key.
    tenant_max_running_jobs: int = Field(default=4, ge=1)
    tenant_max_queued_jobs: int = Field(default=100, ge=1)
    tenant_max_storage_bytes: int = Field(default=100 * 1024**3, ge=1)
    tenant_requests_per_minute: int = Field(default=1200, ge=1)
    # Where API processes share request counts; default: the broker when it is Redis, else counted in
    # this process (the embedded mode has one API process).
    rate_limit_redis_url: str | None = None

    torch_threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda

    # Dataset limits (design.md §9)
    max_upload_bytes: int = 512 * 1024 * 1024
    max_archive_entries: int = 10_000
    max_archive_bytes: int = 2 * 1024 * 1024 * 1024
    max_entry_bytes: int = 64 * 1024 * 1024
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    max_caption_bytes: int = 2048

    @field_validator("webhook_allow_hosts", "train_worker_memory_gib", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        # The environment gives "127.0.0.1,receiver" (or "24,80") or a JSON list; both mean a list.
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [h.strip() for h in text.split(",") if h.strip()]
            )
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'atelier.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_root is None:
            self.storage_root = self.home / "storage"
        if self.model_cache is None:
            self.model_cache = self.home / "models"
        for model_id, source in self.base_models.items():
            if not source:
                raise ValueError(f"base model {model_id!r} has an empty source")
        self._check_memory_planning()
        if self.webhook_max_attempts < 1 or self.webhook_timeout_s <= 0:
            raise ValueError("webhook_max_attempts must be at least 1 and webhook_timeout_s positive")
        if self.lease_s <= self.heartbeat_s * 2:
            raise ValueError("lease_s must exceed two heartbeats, or live jobs get reaped")
        return self

    def _check_memory_planning(self) -> None:
        for model_id, name in self.base_architectures.items():
            if model_id not in self.base_models:
                raise ValueError(f"base_architectures names {model_id!r}, which is not in base_models")
            if name not in KNOWN:
                raise ValueError(
                    f"base_architectures[{model_id!r}] is {name!r}; known: {', '.join(sorted(KNOWN))}"
                )
        if any(gib <= 0 for gib in self.train_worker_memory_gib):
            raise ValueError("train_worker_memory_gib entries must be positive")
        if self.worker_live_s <= self.worker_announce_s * 2:
            raise ValueError("worker_live_s must exceed two announcements, or live workers lapse")

    @property
    def rate_limit_redis(self) -> str | None:
        if self.rate_limit_redis_url:
            return self.rate_limit_redis_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Tests and the CLI change the environment, then drop the cached settings."""
    get_settings.cache_clear()
