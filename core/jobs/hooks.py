"""What a running attempt's loop reaches the outside world through: the heartbeat that keeps its lease
and writes its progress, and the hooks for cancel, checkpoints, samples and cached images."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from core.config import Settings
from core.db import session_scope
from core.jobs import states as jobs
from core.models import Job
from core.storage.base import ObjectNotFound, Storage, download_prefix, upload_dir
from core.storage.keys import cached_images_prefix, job_prefix

# Set in a worker's pool process when its worker shuts down (worker/lifecycle.py, from a signal
# handler): the attempt stops at the loop's next report point and hands the job back.
_shutdown = threading.Event()

log = logging.getLogger(__name__)


def request_shutdown() -> None:
    _shutdown.set()


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
