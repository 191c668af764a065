"""What a finished training stores: the trained files, their exports and the manifest, last.

The loop (core/training/loop.py) trains and returns what it trained; this module turns that into an
artifact: every export format the method offers, then `manifest.json` hashing every file. No
manifest, no artifact: a reader that finds one knows every file it names is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.bases.allow_list import architecture_of_folder
from core.exports import ExportContext, write_exports
from core.methods import get_method
from core.methods.base import Method
from core.spec.job import JobSpec
from core.storage.artifacts import MANIFEST_NAME, write_manifest
from core.training.caching import CaptionedImage
from core.training.loop import TrainResult, train
from core.training.progress import TrainingHooks


@dataclass
class TrainedArtifact(TrainResult):
    """A TrainResult stored as an artifact: `files` ends with manifest.json."""

    exports: dict[str, list[str]] = field(default_factory=dict)  # format -> files under exports/


def train_artifact(
    *,
    spec: JobSpec,
    base: Any,
    items: list[CaptionedImage],
    workdir: Path,
    hooks: TrainingHooks,
    device: torch.device,
    name: str = "atelier",
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainedArtifact:
    """Train `spec` with its method, then write the artifact under workdir/artifact. `name` is the
    file stem of the exports (A1111 prompts refer to a LoRA by it)."""
    method = get_method(spec.params.method)
    result = train(
        method=method,
        spec=spec,
        base=base,
        items=items,
        workdir=workdir,
        hooks=hooks,
        device=device,
        initial_state=initial_state,
    )
    return write_artifact(result, method=method, spec=spec, base=base, name=name, hooks=hooks)


def write_artifact(
    result: TrainResult, *, method: Method, spec: JobSpec, base: Any, name: str, hooks: TrainingHooks
) -> TrainedArtifact:
    """Exports beside the trained files, then the manifest over all of them."""
    exports, export_errors = write_exports(
        method.name,
        result.artifact_dir,
        ExportContext(base.path, spec.base_model, base.family, spec.params, spec.training, name),
    )
    write_manifest(
        result.artifact_dir,
        method=method.name,
        base_model=spec.base_model,
        base_family=base.family,
        base_architecture=architecture_of_folder(Path(base.path)),
        params=spec.params.model_dump(mode="json"),
        training=spec.training.model_dump(mode="json"),
        metrics=_metrics(result),
        artifact_format=method.artifact_format,
        exports=exports,
        export_errors=export_errors,
    )
    hooks.phase("exporting", done=1, total=1)
    stored = TrainedArtifact(**vars(result), exports=exports)
    stored.files = [*result.files, MANIFEST_NAME]
    return stored


def _metrics(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "final_loss": result.final_loss if math.isfinite(result.final_loss) else None,
        "images_per_s": result.images_per_s,
        "resumed_from_step": result.resumed_from_step,
        "images": result.images,
        # (step, loss) at each report point since this attempt started: the loss curve.
        "loss_history": [[step, loss] for step, loss in result.loss_history],
        "compile": result.compile,
    }
