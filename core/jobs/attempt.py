"""One attempt's work between claim and finish: load the base and the data, predict an init_from
start, train, store the artifact (waiting out a storage outage)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import Settings
from core.db import session_scope
from core.jobs import states as jobs
from core.jobs.hooks import JobHooks
from core.models import Dataset, Job
from core.storage.base import Storage, StorageError, download_prefix, upload_dir

log = logging.getLogger(__name__)


class PermanentJobError(Exception):
    """Retrying cannot help (bad data, incompatible base): the job fails at once with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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


def train_and_store(
    settings: Settings,
    storage: Storage,
    job: Job,
    dataset: Dataset | None,
    hooks: JobHooks,
    workdir: Path,
    prefix: str,
) -> jobs.ArtifactRecord:
    """Load, train, then store the artifact under `prefix` (manifest last)."""
    from core.devices import pick_device
    from core.jobs.artifact import train_artifact
    from core.spec.job import JobSpec

    spec = JobSpec.model_validate(job.spec)
    items = _training_items(storage, job, dataset, spec)
    device, _ = pick_device(settings)
    # Compiled training steps (training.compile) persist in inductor's disk cache: keep it beside the
    # model cache, which outlives /tmp and is shared by this host's workers (a deployment may set it).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.model_cache or ".") / "compile-cache"))
    base = _load_base(settings, storage, spec, device, hooks)
    initial_state = None
    if spec.init_from is not None:
        initial_state, items = _personalised_start(settings, storage, job, spec, base, device, workdir, items)
    result = train_artifact(
        spec=spec,
        base=base,
        items=items,
        workdir=workdir,
        hooks=hooks,
        device=device,
        name=f"atelier-{job.id}",
        initial_state=initial_state,
    )
    return _upload(settings, storage, job, hooks, result.artifact_dir, prefix)


def _training_items(storage: Storage, job: Job, dataset: Dataset | None, spec: Any) -> list[Any]:
    from core.datasets.ingest import load_items

    if dataset is None and spec.init_from is None:
        raise PermanentJobError("dataset_missing", f"job {job.id} has no dataset (it was deleted)")
    if dataset is None:
        return []
    items = load_items(storage=storage, dataset_prefix=dataset.storage_prefix)
    if not items:
        raise PermanentJobError("dataset_empty", f"dataset {dataset.id} has no images")
    return items


def _load_base(settings: Settings, storage: Storage, spec: Any, device: Any, hooks: JobHooks) -> Any:
    from core.bases.loader import load_base
    from core.training.optim import component_dtypes, resolve_precision

    # Frozen components load straight into the training's low-precision dtype (an fp32 SDXL would
    # need 14 GB on the device first); trained ones in fp32, so full fine-tunes never start from
    # bf16 copies.
    precision = resolve_precision(spec.training.mixed_precision, device)
    return load_base(
        spec.base_model,
        settings=settings,
        device=device,
        dtype=component_dtypes(spec.params, precision),
        fetch_prefix=functools.partial(
            download_prefix, storage, on_progress=functools.partial(hooks.on_phase, "downloading_base")
        ),
        on_phase=hooks.on_phase,
    )


def _personalised_start(
    settings: Settings,
    storage: Storage,
    job: Job,
    spec: Any,
    base: Any,
    device: Any,
    workdir: Path,
    items: list[Any],
) -> tuple[Any, list[Any]]:
    """init_from: the predicted LoRA to start from, and the items to train on (the dataset's, or
    the reference images), captioned with the prompt the hyper_lora's LoRAs answer to."""
    from core.datasets.ingest import DatasetItem

    prediction, references = _predict_init(settings, storage, job, spec, base, device, workdir)
    prompt = prediction.instance_prompt
    own = [DatasetItem(image=i.image, caption=i.caption or prompt, name=i.name) for i in items]
    refs = [
        DatasetItem(image=im, caption=prompt, name=f"reference-{n}.png") for n, im in enumerate(references)
    ]
    return prediction.state, own or refs


def _upload(
    settings: Settings, storage: Storage, job: Job, hooks: JobHooks, artifact_dir: Path, prefix: str
) -> jobs.ArtifactRecord:
    from core.storage.artifacts import MANIFEST_NAME, read_manifest

    # The job layer hashed every file into the manifest it wrote last; no manifest means no artifact.
    manifest = read_manifest(artifact_dir)
    manifest_path = artifact_dir / MANIFEST_NAME
    manifest_bytes = manifest_path.read_bytes()
    # The manifest goes last: a reader that finds it knows every file it names is complete. Set
    # aside rather than copying the artifact (gigabytes for DreamBooth) to leave it out.
    manifest_path.unlink()
    files = sum(1 for path in artifact_dir.rglob("*") if path.is_file()) + 1  # and the manifest

    def store() -> None:  # the same keys each time: a retry overwrites what a failed try left
        upload_dir(
            storage,
            artifact_dir,
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
    from core.generation.images import ImageNotFound, load_image
    from core.methods.init_from import check_compatible
    from core.methods.personalise import predict_lora
    from core.models import Artifact

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
