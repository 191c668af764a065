"""Generation: load the base pipeline (cached per process), apply artifacts, generate, store PNGs.

Adapters are removed after every request, so nothing one request applied leaks into the next. Per
process the worker keeps a few base pipelines (LRU), each base's CLIP image encoder once an
IP-Adapter needed it, and local copies of artifacts keyed by their content's sha256.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo

from core.config import Settings
from core.db import session_scope
from core.generation import states
from core.generation.handback import hand_back
from core.generation.heartbeat import LEASE_LOST, SHUTDOWN, GenerationHeartbeat, GenerationStopped
from core.generation.images import attempt_prefix, generation_prefix, load_image
from core.generation.params import GenerationSpec
from core.logs import log_context
from core.models import Artifact, Generation, JobStatus
from core.spec.catalogue import GENERATION_USES
from core.storage.artifacts import (
    ArtifactError,
    content_key,
    local_copies_root,
    local_copy,
    primary_files,
    sha256_file,
)
from core.storage.base import Storage, download_prefix

log = logging.getLogger(__name__)
MAX_PIPELINES = 2


@dataclass
class CachedBase:
    pipe: Any
    path: Path  # the base's local diffusers folder
    image_encoder: Any | None = None  # loaded on the first IP-Adapter request on this base


_pipelines: OrderedDict[str, CachedBase] = OrderedDict()


def get_pipeline(model_id: str, settings: Settings, storage: Storage) -> CachedBase:
    """A bounded LRU of base pipelines (and their local folders): loading one costs seconds to minutes."""
    from core.bases.loader import ensure_local, load_pipeline
    from core.devices import pick_device

    if model_id in _pipelines:
        _pipelines.move_to_end(model_id)
        return _pipelines[model_id]
    device, dtype = pick_device(settings)
    fetch = functools.partial(download_prefix, storage)
    pipe = load_pipeline(model_id, settings=settings, device=device, dtype=dtype, fetch_prefix=fetch)
    pipe.set_progress_bar_config(disable=True)
    _pipelines[model_id] = CachedBase(pipe, ensure_local(model_id, settings=settings, fetch_prefix=fetch))
    while len(_pipelines) > MAX_PIPELINES:
        _pipelines.popitem(last=False)
    return _pipelines[model_id]


def forget_pipeline(model_id: str) -> None:
    _pipelines.pop(model_id, None)


def image_encoder(cached: CachedBase, settings: Settings) -> Any | None:
    """The base's CLIP image encoder, loaded once per cached base (IP-Adapter requests)."""
    from core.bases.loader import image_encoder_folder
    from core.methods.ip_adapter import load_image_encoder

    if cached.image_encoder is None:
        path = image_encoder_folder(cached.path, settings)
        if path is None:  # the adapter's apply says what is missing
            return None
        pipe = cached.pipe
        cached.image_encoder = load_image_encoder(path, dtype=pipe.dtype).to(pipe.device)
    return cached.image_encoder


def artifact_dir(artifact: Artifact, storage: Storage, settings: Settings) -> Path:
    """The artifact's files on local disk, one copy per content (see `content_key`): identical
    artifacts share it, and an artifact whose files were replaced gets a new one, never the stale."""
    assert settings.model_cache is not None
    root = local_copies_root(settings.model_cache)
    key = content_key(artifact.manifest)
    local = local_copy(settings.model_cache, artifact.id, artifact.manifest)
    if key is None:  # no file hashes to key or check by: a copy per artifact id
        if not (local / "manifest.json").exists():
            download_prefix(storage, artifact.storage_prefix, local)
        return local
    if local.is_dir():
        return local
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=root))
    try:
        _fetch_files(storage, artifact.storage_prefix, artifact.manifest, staging)
        try:
            staging.rename(local)  # complete or absent: readers never see half a copy
        except OSError:
            if not local.is_dir():  # else another process put the same content in place first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _fetch_files(storage: Storage, prefix: str, manifest: dict[str, Any], folder: Path) -> None:
    """Download the files generation reads and check each against its manifest sha256."""
    root = folder.resolve()
    for entry in primary_files(manifest):
        name = str(entry["name"])
        path = (folder / name).resolve()
        if not path.is_relative_to(root) or path == root:  # a manifest is data, not a path to trust
            raise ArtifactError(f"manifest names a file outside the artifact: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(f"{prefix.rstrip('/')}/{name}", path)
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{prefix}/{name} does not match its manifest sha256")


@dataclass
class Use:
    """One artifact as a request uses it, resolved by the worker."""

    artifact: Artifact
    scale: float
    image: Any | None  # PIL


def image_seeds(spec: GenerationSpec) -> list[int]:
    """Image i uses seed + i: each image can be made again alone, with num_images 1."""
    assert spec.seed is not None, "the worker fixes the seed before generating"
    return [spec.seed + index for index in range(spec.num_images)]


def generate_images(
    *,
    spec: GenerationSpec,
    uses: list[Use],
    settings: Settings,
    storage: Storage,
    output_type: str = "pil",
    on_step: Callable[[], None] | None = None,
) -> list[Any]:
    """The images of `spec`, whose seed is fixed (run_generation draws one when the request has
    none); `output_type` "np" gives float arrays, for comparisons finer than 8-bit pixels.
    `on_step` runs after every denoising step; what it raises stops the generation there."""
    from core.bases.loader import image_encoder_folder
    from core.methods import get_method
    from core.methods.context import ArtifactUse, GenerationContext, applied, undo_all

    cached = get_pipeline(spec.base_model, settings, storage)
    encoder_path = image_encoder_folder(cached.path, settings)
    ctx = GenerationContext(pipe=cached.pipe, base_path=cached.path, image_encoder_path=encoder_path)
    applications = [
        (
            get_method(use.artifact.method),
            artifact_dir(use.artifact, storage, settings),
            use.artifact.manifest,
            ArtifactUse(adapter_name=f"a{index}", scale=use.scale, image=use.image),
        )
        for index, use in enumerate(uses)
    ]
    wants_encoder = any(GENERATION_USES[use.artifact.method].image_encoder for use in uses)
    encoder = image_encoder(cached, settings) if wants_encoder else None
    # One generator per image, so image i does not depend on how many came before it.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in image_seeds(spec)]
    try:
        # Both push undos before `applied` runs them; undo_all below covers a failure in between.
        if spec.scheduler is not None:
            ctx.use_scheduler(spec.scheduler)
        if encoder is not None:
            ctx.provide_image_encoder(encoder)
        with applied(ctx, applications) as call:
            result = call(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                width=spec.width,
                height=spec.height,
                num_images_per_prompt=spec.num_images,
                generator=generators,
                output_type=output_type,
                **ctx.call_kwargs,
                **ctx.controlnet_kwargs(),
                **_step_callback(on_step),
            )
    finally:
        try:
            undo_all(ctx)
        finally:
            # An undo that failed may have left the cached pipeline changed: load it afresh next time.
            if ctx.dirty:
                forget_pipeline(spec.base_model)
    return list(result.images)


def _step_callback(on_step: Callable[[], None] | None) -> dict[str, Any]:
    if on_step is None:
        return {}

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step()
        return tensors

    return {"callback_on_step_end": callback}


def png_parameters(spec: GenerationSpec, index: int) -> dict[str, Any]:
    """What a PNG records: the request, with `seed` this image's own (request seed + index), so
    the same parameters with num_images 1 make this image again."""
    return {**spec.model_dump(mode="json"), "seed": image_seeds(spec)[index], "index": index}


def _png(image: Any, spec: GenerationSpec, index: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", json.dumps(png_parameters(spec, index)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@dataclass(frozen=True)
class Claimed:
    """What one attempt needs of its generation's row, read once when it was claimed."""

    generation_id: str
    attempt: int
    tenant_id: str
    spec: GenerationSpec
    artifacts: dict[str, Artifact | None]


def this_process() -> str:
    """How a generation row names the process running it when the caller names none."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_generation(
    *, generation_id: str, settings: Settings, storage: Storage, worker_id: str | None = None
) -> str | None:
    """Answer a generate message: claim the generation (a duplicate message finds it claimed and
    does nothing) and run one attempt under a lease. Returns the status it ended in, "handed_back"
    when the worker's shutdown gave it back to the queue, or None when it was not ours to run or
    the attempt lost its lease (the reaper re-queued it)."""
    claimed = _claim(generation_id, settings, worker_id or this_process())
    if claimed is None:
        return None
    with log_context(attempt=claimed.attempt):
        log.info("generation %s attempt %s started", generation_id, claimed.attempt)
        heartbeat = GenerationHeartbeat(
            settings=settings, generation_id=generation_id, attempt=claimed.attempt
        )
        heartbeat.start()
        try:
            return _attempt(claimed, settings, storage, heartbeat)
        finally:
            heartbeat.stop()


def _claim(generation_id: str, settings: Settings, worker_id: str) -> Claimed | None:
    with session_scope(settings.database_url) as session:
        attempt = states.claim(
            session=session, generation_id=generation_id, worker_id=worker_id, lease_s=settings.lease_s
        )
        if attempt is None:
            return None
        generation = session.get(Generation, generation_id)
        assert generation is not None
        spec = GenerationSpec.model_validate(generation.spec)
        if spec.seed is None:  # requests queued before the API fixed the seed
            spec = spec.model_copy(update={"seed": secrets.randbelow(2**32 - spec.num_images)})
        artifacts = {ref.artifact_id: session.get(Artifact, ref.artifact_id) for ref in spec.uses()}
        return Claimed(generation_id, attempt, generation.tenant_id, spec, artifacts)


def _attempt(
    claimed: Claimed, settings: Settings, storage: Storage, heartbeat: GenerationHeartbeat
) -> str | None:
    """Generate, store under the attempt's own prefix while the lease holds, finish fenced."""
    prefix = attempt_prefix(claimed.tenant_id, claimed.generation_id, claimed.attempt)
    outcome: dict[str, Any]
    try:
        uses = _uses(claimed, storage)
        images = generate_images(
            spec=claimed.spec, uses=uses, settings=settings, storage=storage, on_step=heartbeat.check
        )
        heartbeat.confirm()
        outcome = {"status": JobStatus.succeeded, "image_keys": _store(images, claimed.spec, prefix, storage)}
    except GenerationStopped as stopped:
        if stopped.reason == LEASE_LOST:
            return _lost(claimed, prefix, storage)
        if stopped.reason == SHUTDOWN:
            return _hand_back(claimed, settings, prefix, storage)
        outcome = {"status": JobStatus.canceled}
    except Exception as exc:
        log.exception("generation %s failed", claimed.generation_id)
        outcome = {
            "status": JobStatus.failed,
            "error_code": "generation_error",
            "error_message": f"{type(exc).__name__}: {exc}"[:2000],
        }
    try:
        with session_scope(settings.database_url) as session:
            states.finish(
                session=session, generation_id=claimed.generation_id, attempt=claimed.attempt, **outcome
            )
    except states.LeaseLost:
        return _lost(claimed, prefix, storage)
    status = outcome["status"]
    log.info("generation %s attempt %s ended: %s", claimed.generation_id, claimed.attempt, status)
    if status == JobStatus.succeeded:
        _remove_others(claimed, outcome["image_keys"], storage)
    else:
        _discard(prefix, storage)  # a failure mid-store leaves some of its images
    return str(status)


def _uses(claimed: Claimed, storage: Storage) -> list[Use]:
    uses = []
    for ref in claimed.spec.uses():
        row = claimed.artifacts[ref.artifact_id]
        if row is None:
            raise LookupError(f"artifact {ref.artifact_id} no longer exists")
        image = load_image(ref.image, claimed.tenant_id, storage) if ref.image else None
        uses.append(Use(row, ref.scale, image))
    return uses


def _store(images: list[Any], spec: GenerationSpec, prefix: str, storage: Storage) -> list[str]:
    keys = []
    for index, image in enumerate(images):
        key = f"{prefix}/{index}.png"
        storage.put_bytes(key, _png(image, spec, index), content_type="image/png")
        keys.append(key)
    return keys


def _lost(claimed: Claimed, prefix: str, storage: Storage) -> None:
    """The reaper took the generation back while this attempt ran: another attempt owns it now."""
    log.warning(
        "generation %s attempt %s lost its lease; discarding what it stored",
        claimed.generation_id,
        claimed.attempt,
    )
    _discard(prefix, storage)
    return None


def _hand_back(claimed: Claimed, settings: Settings, prefix: str, storage: Storage) -> str | None:
    """The worker is shutting down: the generation goes back to the queue for the next worker."""
    log.info(
        "generation %s attempt %s stopped: the worker is shutting down",
        claimed.generation_id,
        claimed.attempt,
    )
    # Nothing this attempt stored is the generation's: gone before the next attempt can start.
    _discard(prefix, storage)
    outcome = hand_back(settings=settings, generation_id=claimed.generation_id, attempt=claimed.attempt)
    return None if outcome == LEASE_LOST else outcome


def _discard(prefix: str, storage: Storage) -> None:
    try:
        storage.delete_prefix(prefix)
    except Exception:
        # Left for the attempt that succeeds (_remove_others), or for the generation's deletion.
        log.warning("could not remove %s", prefix, exc_info=True)


def _remove_others(claimed: Claimed, keep: list[str], storage: Storage) -> None:
    """Images an earlier attempt stored before its worker died: the generation's are the winner's
    alone. Best effort, as deleting the generation removes its whole prefix anyway."""
    kept = set(keep)
    try:
        for key in storage.list(generation_prefix(claimed.tenant_id, claimed.generation_id)):
            if key not in kept:
                storage.delete(key)
    except Exception:
        log.warning("could not remove earlier attempts' images of %s", claimed.generation_id, exc_info=True)
