"""Runs one training job attempt: claim → load base and data → the loop → artifact → finish.

The worker task is a thin call into `run_training_job`. Everything the loop needs from the
outside world (lease renewal, cancel, checkpoints, samples) goes through `JobHooks`.
"""

from __future__ import annotations

import contextvars
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from core import jobs, scheduling
from core.config import Settings
from core.db import session_scope
from core.logs import log_context
from core.models import Dataset, Job, JobStatus
from core.storage import ObjectNotFound, Storage, StorageError, download_prefix, upload_dir

log = logging.getLogger(__name__)

# Set in a worker's pool process when its worker shuts down (worker/lifecycle.py, from a signal
# handler): the attempt stops at the loop's next report point and hands the job back.
_shutdown = threading.Event()


def request_shutdown() -> None:
    _shutdown.set()


class PermanentJobError(Exception):
    """Retrying cannot help (bad data, incompatible base): the job fails at once with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def job_prefix(tenant_id: str, job_id: str) -> str:
    """Everything a job's attempts write: checkpoints/, samples/, attempt-N/ (the artifact)."""
    return f"tenants/{tenant_id}/jobs/{job_id}"


def cached_images_prefix(tenant_id: str, key: str) -> str:
    """Images derived from a base alone (DreamBooth's class images), shared by a tenant's jobs."""
    return f"tenants/{tenant_id}/cache/images/{key}"


class Heartbeat(threading.Thread):
    """Renews the lease every `heartbeat_s` for the whole attempt, also while models load or latents
    are cached, and writes the newest progress: within `progress_interval_s` of a change, and never
    more often (a phase reports every image; the row is written a couple of times a second at most).
    The loop reads `stop_reason` at its report points."""

    def __init__(self, *, settings: Settings, job_id: str, attempt: int) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.settings, self.job_id, self.attempt = settings, job_id, attempt
        # A thread starts with an empty context: carry the creator's, so its logs name the job too.
        self._context = contextvars.copy_context()
        self.progress: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self._done = threading.Event()
        self._changed = threading.Event()

    def report(self, **fields: Any) -> None:
        """Merge `fields` (jobs.heartbeat's progress arguments) into what the next write carries."""
        self.progress = {**self.progress, **fields}
        self._changed.set()

    def beat(self) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                cancel = jobs.heartbeat(
                    session=session,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    lease_s=self.settings.lease_s,
                    **self.progress,
                )
            if cancel:
                self.stop_reason = "canceled"
        except jobs.LeaseLost:
            self.stop_reason = "lease_lost"
        except Exception:
            # A database blip must not kill the job: the lease has slack for a few missed beats.
            log.warning("heartbeat for job %s failed; retrying", self.job_id, exc_info=True)

    def run(self) -> None:
        self._context.run(self._beat_until_stopped)

    def _beat_until_stopped(self) -> None:
        written = time.monotonic()
        while True:
            self._changed.wait(self.settings.heartbeat_s)  # a change, or time to renew the lease
            hold = written + self.settings.progress_interval_s - time.monotonic()
            if self._done.wait(max(hold, 0.0)):
                return
            self._changed.clear()
            self.beat()
            written = time.monotonic()

    def flush(self) -> None:
        """Write the newest progress now: the attempt is about to finish, and a finished job's row
        takes no more heartbeats."""
        self._changed.clear()
        self.beat()

    def stop(self) -> None:
        self._done.set()
        self._changed.set()


class JobHooks:
    """The loop's view of the job: progress, cancellation, checkpoints and samples, all fenced."""

    def __init__(
        self,
        *,
        settings: Settings,
        storage: Storage,
        job: Job,
        attempt: int,
        heartbeat: Heartbeat,
        workdir: Path,
    ) -> None:
        self.settings, self.storage, self.attempt = settings, storage, attempt
        self.job_id, self.tenant_id = job.id, job.tenant_id
        self.checkpoint_key, self.checkpoint_step = job.checkpoint_key, job.checkpoint_step
        self.heartbeat, self.workdir = heartbeat, workdir
        self._last_report = 0.0
        self._phase: str | None = None

    def _stop_if_asked(self) -> None:
        from core.training.progress import StopTraining

        if self.heartbeat.stop_reason:
            raise StopTraining(self.heartbeat.stop_reason)
        if _shutdown.is_set():
            raise StopTraining("shutdown")

    def should_report(self, step: int) -> bool:
        return time.monotonic() - self._last_report >= min(self.settings.heartbeat_s, 2.0)

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self._last_report = time.monotonic()
        self.heartbeat.report(step=step, loss=loss, images_per_s=images_per_s)
        self.phase("training", done=step, total=total)

    def phase(self, name: str, *, done: int, total: int) -> None:
        """Every call reaches the heartbeat, which bounds the writes; entering a phase is also an
        event (a few per attempt), so the order of phases survives however briefly each lasted."""
        if name != self._phase:
            self._phase = name
            log.info("job %s entered %s", self.job_id, name, extra={"phase": name, "total": total})
            self._event("phase", {"phase": name, "total": total})
        self.heartbeat.report(phase=name, phase_done=done, phase_total=total)
        self._stop_if_asked()

    def on_phase(self, name: str, done: int, total: int) -> None:
        """`phase` as the positional callback the base loader and storage helpers take."""
        self.phase(name, done=done, total=total)

    def save_checkpoint(self, *, step: int, folder: Path) -> None:
        prefix = f"{job_prefix(self.tenant_id, self.job_id)}/checkpoints/step-{step:08d}"
        upload_dir(self.storage, folder, prefix)
        with session_scope(self.settings.database_url) as session:
            jobs.record_checkpoint(
                session=session, job_id=self.job_id, attempt=self.attempt, step=step, key=prefix
            )
        previous, self.checkpoint_key, self.checkpoint_step = self.checkpoint_key, prefix, step
        if previous and previous != prefix:
            self.storage.delete_prefix(previous + "/")  # only the newest complete checkpoint is kept
        self._stop_if_asked()

    def load_checkpoint(self) -> tuple[int, Path] | None:
        if not self.checkpoint_key or self.checkpoint_step is None:
            return None
        local = self.workdir / "resume"
        download_prefix(self.storage, self.checkpoint_key, local)
        with session_scope(self.settings.database_url) as session:
            jobs.add_event(
                session=session,
                job_id=self.job_id,
                attempt=self.attempt,
                type="resumed",
                data={"from_step": self.checkpoint_step},
            )
        return self.checkpoint_step, local

    def save_samples(self, *, step: int, images: list, prompts: list[str]) -> None:
        prefix = f"{job_prefix(self.tenant_id, self.job_id)}/samples"
        stored = []
        for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            key = f"{prefix}/step-{step:08d}-{index}.png"
            self.storage.put_bytes(key, buffer.getvalue(), content_type="image/png")
            stored.append({"key": key, "prompt": prompt})
        with session_scope(self.settings.database_url) as session:
            jobs.add_event(
                session=session,
                job_id=self.job_id,
                attempt=self.attempt,
                type="sample",
                data={"step": step, "images": stored},
            )

    def cached_images(self, *, key: str, count: int, make: Any) -> list[Any]:
        """Images derived from the base alone (DreamBooth's class images), kept per tenant and
        reused by later jobs; `index.json` is written last, so a half-written set is never read."""
        from PIL import Image

        prefix = cached_images_prefix(self.tenant_id, key)
        try:
            index = json.loads(self.storage.get_bytes(f"{prefix}/index.json"))
        except ObjectNotFound:
            index = None
        if index is not None and index.get("count") == count:
            images = []
            for name in index["files"]:
                with Image.open(
                    io.BytesIO(self.storage.get_bytes(f"{prefix}/{name}")), formats=["PNG"]
                ) as im:
                    images.append(im.convert("RGB"))
            self._event("cached_images", {"key": key, "count": count, "reused": True})
            return images
        images = make(count)
        names = []
        for number, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            names.append(f"{number:05d}.png")
            self.storage.put_bytes(f"{prefix}/{names[-1]}", buffer.getvalue(), content_type="image/png")
        index_bytes = json.dumps({"count": count, "files": names}).encode()
        self.storage.put_bytes(f"{prefix}/index.json", index_bytes, content_type="application/json")
        self._event("cached_images", {"key": key, "count": count, "reused": False})
        return images

    def _event(self, type_: str, data: dict[str, Any]) -> None:
        with session_scope(self.settings.database_url) as session:
            jobs.add_event(session=session, job_id=self.job_id, attempt=self.attempt, type=type_, data=data)


def run_training_job(*, job_id: str, settings: Settings, storage: Storage, worker_id: str) -> str | None:
    """Answer a train message: claim the next job by the fair rule (core/scheduling.py; the
    message's `job_id` only rang the bell) and run one attempt of it. Returns the final or interim
    status, None when nothing could start (all claimed, canceled, or their tenants at their limit)."""
    with session_scope(settings.database_url) as session:
        claimed = scheduling.claim_next(session=session, settings=settings, worker_id=worker_id)
        if claimed is None:
            log.info("message for job %s: no job may start now (none queued or all capped)", job_id)
            return None
        job_id, attempt = claimed.job_id, claimed.attempt
        job = session.get(Job, job_id)
        assert job is not None
        # None only for a personalisation job (init_from) trained on its reference images.
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
    # Every record logged during the attempt, by any logger in this thread, carries these fields.
    with log_context(job_id=job_id, attempt=attempt):
        log.info("job %s attempt %s started", job_id, attempt, extra={"method": job.method})
        heartbeat = Heartbeat(settings=settings, job_id=job_id, attempt=attempt)
        heartbeat.start()
        workdir = Path(tempfile.mkdtemp(prefix=f"atelier-{job_id}-"))
        try:
            hooks = JobHooks(
                settings=settings,
                storage=storage,
                job=job,
                attempt=attempt,
                heartbeat=heartbeat,
                workdir=workdir,
            )
            outcome = _attempt(settings, storage, job, dataset, attempt, hooks, workdir)
            log.info("job %s attempt %s ended: %s", job_id, attempt, outcome)
            return outcome
        finally:
            heartbeat.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            _ring_for_tenant(settings, job.tenant_id)


def _ring_for_tenant(settings: Settings, tenant_id: str) -> None:
    """A running slot of this tenant is free again. If the tenant was at its running-jobs limit, a
    message may have found its jobs capped and been spent: ring once more for its waiting jobs."""
    from core.limits import tenant_limits
    from worker.app import send_train

    try:
        with session_scope(settings.database_url) as session:
            running = session.scalar(
                select(func.count()).where(Job.tenant_id == tenant_id, Job.status == JobStatus.running)
            )
            cap = tenant_limits(session=session, settings=settings, tenant_id=tenant_id).max_running_jobs
            waiting = scheduling.next_waiting(session=session, tenant_id=tenant_id)
        if waiting is not None and int(running or 0) + 1 >= cap:
            send_train(waiting)
    except Exception:
        # The reaper re-sends queued jobs that waited past queued_redispatch_s.
        log.warning("could not ring for tenant %s's waiting jobs", tenant_id, exc_info=True)


def _attempt(
    settings: Settings,
    storage: Storage,
    job: Job,
    dataset: Dataset | None,
    attempt: int,
    hooks: JobHooks,
    workdir: Path,
) -> str:
    from core.methods.base import MethodInputError
    from core.training.progress import StopTraining

    attempt_prefix = f"{job_prefix(job.tenant_id, job.id)}/attempt-{attempt}"
    try:
        artifact = _train_and_store(settings, storage, job, dataset, hooks, workdir, attempt_prefix)
        hooks.heartbeat.flush()  # the upload's final count, which the heartbeat may be holding back
        outcome = _finish(settings, job.id, attempt, JobStatus.succeeded, artifact=artifact)
        if outcome == "lease_lost":
            _discard(storage, attempt_prefix)  # another attempt owns the job now
        return outcome
    except StopTraining as stop:
        _discard(storage, attempt_prefix)
        if stop.reason == "canceled":
            return _finish(settings, job.id, attempt, JobStatus.canceled)
        if stop.reason == "shutdown":
            log.info("job %s attempt %s stopped: the worker is shutting down", job.id, attempt)
            return hand_back(settings=settings, job_id=job.id, attempt=attempt)
        log.warning("job %s attempt %s lost its lease; stopping", job.id, attempt)
        return "lease_lost"
    except jobs.LeaseLost:
        _discard(storage, attempt_prefix)
        return "lease_lost"
    except (PermanentJobError, MethodInputError) as exc:
        _discard(storage, attempt_prefix)
        return _finish(settings, job.id, attempt, JobStatus.failed, code=exc.code, message=str(exc))
    except Exception as exc:
        _discard(storage, attempt_prefix)
        code = _classify(exc)
        if code == "gpu_oom":
            return _finish(settings, job.id, attempt, JobStatus.failed, code=code, message=str(exc)[:2000])
        log.exception("job %s attempt %s failed; releasing it for a retry", job.id, attempt)
        return _release(settings, job.id, attempt, code, f"{type(exc).__name__}: {exc}"[:2000])


def _discard(storage: Storage, prefix: str) -> None:
    """Delete an ended attempt's partial artifact. A storage failure (S3 down) is logged, not raised:
    raised here it would hide why the attempt ended and skip handing the job on. No row names the
    folder, and deleting the job removes it."""
    try:
        storage.delete_prefix(prefix + "/")
    except StorageError:
        log.warning("could not delete %s; deleting the job removes it", prefix, exc_info=True)


def _retry_storage(settings: Settings, hooks: JobHooks, what: str, action: Callable[[], None]) -> None:
    """Run `action`, retrying storage errors with backoff for up to `artifact_upload_retry_s`. For
    work that exists only on this machine (the trained artifact): an S3 outage is waited out, the
    heartbeat keeping the lease, rather than the training thrown away and done again. A cancel or a
    lost lease ends the wait."""
    deadline = time.monotonic() + settings.artifact_upload_retry_s
    delay = 1.0
    while True:
        try:
            action()
            return
        except StorageError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, exc, delay)
        time.sleep(delay)
        hooks._stop_if_asked()
        delay = min(delay * 2, 10.0)


def _classify(exc: Exception) -> str:
    name = type(exc).__name__
    return "gpu_oom" if name == "OutOfMemoryError" else "training_error"


def _train_and_store(
    settings: Settings,
    storage: Storage,
    job: Job,
    dataset: Dataset | None,
    hooks: JobHooks,
    workdir: Path,
    prefix: str,
) -> jobs.ArtifactRecord:

    from core.artifacts import MANIFEST_NAME, read_manifest
    from core.base_loader import load_base
    from core.datasets import DatasetItem, load_items
    from core.devices import pick_device
    from core.methods.params import JobSpec
    from core.training.loop import train
    from core.training.optim import component_dtypes, resolve_precision

    spec = JobSpec.model_validate(job.spec)
    if dataset is None and spec.init_from is None:
        raise PermanentJobError("dataset_missing", f"job {job.id} has no dataset (it was deleted)")
    items: list[Any] = []
    if dataset is not None:
        items = load_items(storage=storage, dataset_prefix=dataset.storage_prefix)
        if not items:
            raise PermanentJobError("dataset_empty", f"dataset {dataset.id} has no images")
    device, _ = pick_device(settings)
    # Compiled training steps (training.compile) persist in inductor's disk cache: keep it beside the
    # model cache, which outlives /tmp and is shared by this host's workers (a deployment may set it).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.model_cache or ".") / "compile-cache"))
    # Frozen components load straight into the training's low-precision dtype (an fp32 SDXL would
    # need 14 GB on the device first); trained ones in fp32, so full fine-tunes never start from
    # bf16 copies.
    precision = resolve_precision(spec.training.mixed_precision, device)
    base = load_base(
        spec.base_model,
        settings=settings,
        device=device,
        dtype=component_dtypes(spec.params, precision),
        fetch_prefix=functools.partial(
            download_prefix, storage, on_progress=functools.partial(hooks.on_phase, "downloading_base")
        ),
        on_phase=hooks.on_phase,
    )
    initial_state = None
    if spec.init_from is not None:
        prediction, references = _predict_init(settings, storage, job, spec, base, device, workdir)
        initial_state = prediction.state
        # Uncaptioned images train with the prompt the hyper_lora's LoRAs answer to.
        items = [
            DatasetItem(image=item.image, caption=item.caption or prediction.instance_prompt, name=item.name)
            for item in items
        ] or [
            DatasetItem(image=image, caption=prediction.instance_prompt, name=f"reference-{i}.png")
            for i, image in enumerate(references)
        ]
    result = train(
        spec=spec,
        base=base,
        items=items,
        workdir=workdir,
        hooks=hooks,
        device=device,
        name=f"atelier-{job.id}",
        initial_state=initial_state,
    )
    # The loop hashed every file into the manifest it wrote last; no manifest means no artifact.
    manifest = read_manifest(result.artifact_dir)
    manifest_path = result.artifact_dir / MANIFEST_NAME
    manifest_bytes = manifest_path.read_bytes()
    # The manifest goes last: a reader that finds it knows every file it names is complete. Set
    # aside rather than copying the artifact (gigabytes for DreamBooth) to leave it out.
    manifest_path.unlink()
    files = sum(1 for path in result.artifact_dir.rglob("*") if path.is_file()) + 1  # and the manifest

    def store() -> None:  # the same keys each time: a retry overwrites what a failed try left
        upload_dir(
            storage,
            result.artifact_dir,
            prefix,
            on_progress=lambda done, _: hooks.phase("uploading", done=done, total=files),
        )
        storage.put_bytes(f"{prefix}/{MANIFEST_NAME}", manifest_bytes, content_type="application/json")

    _retry_storage(settings, hooks, f"storing job {job.id}'s artifact", store)
    hooks.phase("uploading", done=files, total=files)
    return jobs.ArtifactRecord(storage_prefix=prefix, manifest=manifest)


def _predict_init(
    settings: Settings, storage: Storage, job: Job, spec: Any, base: Any, device: Any, workdir: Path
) -> tuple[Any, list[Any]]:
    """init_from: the hyper_lora's LoRA for the job's reference images, and those images. The API
    checked all this; the artifact or an image may have been deleted since."""
    from core.generation_images import ImageNotFound, load_image
    from core.init_from import check_compatible
    from core.models import Artifact
    from core.personalise import predict_lora

    init = spec.init_from
    with session_scope(settings.database_url) as session:
        artifact = session.get(Artifact, init.hyper_lora)
        if artifact is None or artifact.tenant_id != job.tenant_id:
            raise PermanentJobError("init_from_not_found", f"no hyper_lora artifact {init.hyper_lora}")
        manifest = {**artifact.manifest, "method": artifact.method, "base_model": artifact.base_model}
        artifact_prefix = artifact.storage_prefix
    problems = check_compatible(manifest, base_model=spec.base_model, lora=spec.params)
    if problems:
        raise PermanentJobError("artifact_incompatible", "; ".join(problems))
    try:
        references = [load_image(image_id, job.tenant_id, storage) for image_id in init.images]
    except ImageNotFound as missing:
        raise PermanentJobError("image_not_found", f"reference image {missing.image_id} is gone") from None
    local = workdir / "init_from"
    download_prefix(storage, artifact_prefix, local)
    prediction = predict_lora(
        artifact_dir=local, image_encoder_path=base.image_encoder_path, images=references, device=device
    )
    return prediction, references


def _finish(
    settings: Settings,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    artifact: jobs.ArtifactRecord | None = None,
    code: str | None = None,
    message: str | None = None,
) -> str:
    try:
        with session_scope(settings.database_url) as session:
            jobs.finish(
                session=session,
                job_id=job_id,
                attempt=attempt,
                status=status,
                artifact=artifact,
                error_code=code,
                error_message=message,
            )
    except jobs.LeaseLost:
        log.warning("job %s attempt %s finished after losing its lease; result dropped", job_id, attempt)
        return "lease_lost"
    return str(status)


def _release(settings: Settings, job_id: str, attempt: int, code: str, message: str) -> str:
    from worker.app import send_train

    try:
        with session_scope(settings.database_url) as session:
            status = jobs.release(
                session=session, job_id=job_id, attempt=attempt, error_code=code, error_message=message
            )
    except jobs.LeaseLost:
        return "lease_lost"
    if status == JobStatus.queued:
        send_train(job_id)
    return str(status)


def hand_back(*, settings: Settings, job_id: str, attempt: int) -> str:
    """Give a running attempt back because its worker stops: queued again at once and re-sent, so
    the next worker resumes it from its newest checkpoint."""
    from worker.app import send_train

    try:
        with session_scope(settings.database_url) as session:
            status = jobs.hand_back(session=session, job_id=job_id, attempt=attempt, reason="worker_shutdown")
    except jobs.LeaseLost:
        return "lease_lost"
    if status != JobStatus.queued:
        return str(status)
    try:
        send_train(job_id)
    except Exception:
        # The broker is down: the reaper re-sends queued jobs whose message may be lost.
        log.warning("job %s handed back but not re-sent; the reaper re-sends it", job_id, exc_info=True)
        return "handed_back"
    with session_scope(settings.database_url) as session:
        jobs.mark_dispatched(session=session, job_id=job_id)
    return "handed_back"
