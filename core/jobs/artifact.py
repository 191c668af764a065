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
from safetensors import safe_open

from core.bases.allow_list import architecture_of_folder
from core.errors import NonFiniteError
from core.exports import EXPORTS_DIR, ExportContext, write_exports
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
    """Exports beside the trained files, then the manifest over all of them. Weights holding NaN or
    infinite values are refused first (NonFiniteError "non_finite_artifact"): without a manifest
    nothing is stored, and the job fails instead of succeeding with an artifact that generates noise."""
    check_finite(result.artifact_dir)
    exports, export_errors = write_exports(
        method.name,
        result.artifact_dir,
        ExportContext(base.path, spec.base_model, base.family, spec.params, spec.training, name),
    )
    # Exports convert the checked weights, some to fp16, where a finite fp32 weight past 65504 is inf.
    check_finite(result.artifact_dir / EXPORTS_DIR, root=result.artifact_dir)
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


def check_finite(folder: Path, *, root: Path | None = None) -> None:
    """Raise NonFiniteError("non_finite_artifact") when a tensor in a safetensors file under
    `folder` holds NaN or inf (named relative to `root`, default `folder`). Every method and export
    writes its weights as safetensors (design.md §9), so these files are all the weights a user
    gets. One tensor at a time: a DreamBooth UNet is read once more from disk, never held whole."""
    root = root or folder
    bad: list[str] = []
    checked = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - not a dict
                tensor = handle.get_tensor(key)
                checked += 1
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(f"{path.relative_to(root)}:{key}")
    if bad:
        raise NonFiniteError(
            "non_finite_artifact",
            f"the trained weights hold NaN or infinite values in {len(bad)} of {checked} tensors (first: "
            f"{', '.join(bad[:3])}): training diverged, and nothing was stored. A lower learning rate "
            "or a larger batch usually helps",
        )


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
        # Steps whose loss or gradient was not finite, skipped rather than applied (this attempt).
        "skipped_steps": result.skipped_steps,
    }
