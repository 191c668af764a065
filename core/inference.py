"""Generation: load the base pipeline (cached per process), apply artifacts, generate, store PNGs.

Adapters are removed after every request, so nothing one request applied leaks into the next.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import update

from core.config import Settings
from core.db import session_scope
from core.inference_params import GenerationSpec
from core.models import Artifact, Generation, JobStatus
from core.storage import Storage, download_prefix
from core.timeutil import utcnow

log = logging.getLogger(__name__)
MAX_PIPELINES = 2

_pipelines: OrderedDict[str, tuple[Any, Path]] = OrderedDict()


def get_pipeline(model_id: str, settings: Settings, storage: Storage) -> tuple[Any, Path]:
    """A bounded LRU of base pipelines (and their local folders): loading one costs seconds to minutes."""
    from core.base_loader import ensure_local, load_pipeline
    from core.devices import pick_device

    if model_id in _pipelines:
        _pipelines.move_to_end(model_id)
        return _pipelines[model_id]
    device, dtype = pick_device(settings)
    fetch = functools.partial(download_prefix, storage)
    pipe = load_pipeline(model_id, settings=settings, device=device, dtype=dtype, fetch_prefix=fetch)
    pipe.set_progress_bar_config(disable=True)
    _pipelines[model_id] = (pipe, ensure_local(model_id, settings=settings, fetch_prefix=fetch))
    while len(_pipelines) > MAX_PIPELINES:
        _pipelines.popitem(last=False)
    return _pipelines[model_id]


def forget_pipeline(model_id: str) -> None:
    _pipelines.pop(model_id, None)


def artifact_dir(artifact: Artifact, storage: Storage, settings: Settings) -> Path:
    """Artifacts are immutable once their manifest exists, so a local copy is cached by artifact id."""
    assert settings.model_cache is not None
    local = settings.model_cache / "artifacts" / artifact.id
    if not (local / "manifest.json").exists():
        download_prefix(storage, artifact.storage_prefix, local)
    return local


@dataclass
class Use:
    """One artifact as a request uses it, resolved by the worker."""

    artifact: Artifact
    scale: float
    image: Any | None  # PIL


def generate_images(
    *, spec: GenerationSpec, uses: list[Use], settings: Settings, storage: Storage
) -> list[Any]:
    from core.base_loader import image_encoder_folder
    from core.generation_context import ArtifactUse, GenerationContext, applied
    from core.methods import get_method

    pipe, base_path = get_pipeline(spec.base_model, settings, storage)
    ctx = GenerationContext(
        pipe=pipe, base_path=base_path, image_encoder_path=image_encoder_folder(base_path, settings)
    )
    applications = [
        (
            get_method(use.artifact.method),
            artifact_dir(use.artifact, storage, settings),
            use.artifact.manifest,
            ArtifactUse(adapter_name=f"a{index}", scale=use.scale, image=use.image),
        )
        for index, use in enumerate(uses)
    ]
    generator = torch.Generator("cpu").manual_seed(spec.seed if spec.seed is not None else 0)
    try:
        with applied(ctx, applications) as call:
            result = call(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                width=spec.width,
                height=spec.height,
                num_images_per_prompt=spec.num_images,
                generator=generator,
                **ctx.call_kwargs,
                **ctx.controlnet_kwargs(),
            )
    finally:
        # An undo that failed may have left the cached pipeline changed: load it afresh next time.
        if ctx.dirty:
            forget_pipeline(spec.base_model)
    return list(result.images)


def _png(image: Any, spec: GenerationSpec, index: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", json.dumps({**spec.model_dump(mode="json"), "index": index}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run_generation(*, generation_id: str, settings: Settings, storage: Storage) -> str | None:
    with session_scope(settings.database_url) as session:
        claimed = session.execute(
            update(Generation)
            .where(Generation.id == generation_id, Generation.status == JobStatus.queued)
            .values(status=JobStatus.running, attempt=Generation.attempt + 1, started_at=utcnow())
        ).rowcount
        if not claimed:
            return None
        generation = session.get(Generation, generation_id)
        assert generation is not None
        spec = GenerationSpec.model_validate(generation.spec)
        tenant_id = generation.tenant_id
        refs = spec.uses()
        rows = {ref.artifact_id: session.get(Artifact, ref.artifact_id) for ref in refs}
    try:
        from core.generation_images import load_image

        uses = []
        for ref in refs:
            row = rows[ref.artifact_id]
            if row is None:
                raise LookupError(f"artifact {ref.artifact_id} no longer exists")
            image = load_image(ref.image, tenant_id, storage) if ref.image else None
            uses.append(Use(row, ref.scale, image))
        images = generate_images(spec=spec, uses=uses, settings=settings, storage=storage)
        keys = []
        for index, image in enumerate(images):
            key = f"tenants/{tenant_id}/generations/{generation_id}/{index}.png"
            storage.put_bytes(key, _png(image, spec, index), content_type="image/png")
            keys.append(key)
        values: dict[str, Any] = {"status": JobStatus.succeeded, "image_keys": keys}
    except Exception as exc:
        log.exception("generation %s failed", generation_id)
        values = {
            "status": JobStatus.failed,
            "error_code": "generation_error",
            "error_message": f"{type(exc).__name__}: {exc}"[:2000],
        }
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Generation).where(Generation.id == generation_id).values(finished_at=utcnow(), **values)
        )
    return str(values["status"])
