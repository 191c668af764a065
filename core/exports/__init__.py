"""Exports: the trained weights again, in the formats other tools load (kohya / A1111 / ComfyUI /
single-file). Each method's catalogue entry (core/spec/catalogue.py) says what it offers and which
function here writes each format; this module runs them.

Exporters read the trained weights from the finished artifact folder (never from live training
modules, which may be cast to bf16 or wrapped) and untrained parts from the base's folder on disk.
One module per method; each exporter is `export(artifact_dir, out_dir, ctx) -> [file names]`, with
names relative to `out_dir`. A failing export is recorded in the manifest and leaves the primary
artifact intact: users keep what they trained.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.exports.formats import FORMATS
from core.spec.catalogue import CATALOGUE

log = logging.getLogger(__name__)

EXPORTS_DIR = "exports"


@dataclass(frozen=True)
class ExportContext:
    base_path: Path  # the base's local diffusers folder (VAE, text encoders, configs)
    base_model: str  # its id
    family: str  # "sd" | "sdxl"
    params: Any  # the method's params model (rank, alpha, token, layer structure ...)
    training: Any  # TrainingParams
    name: str  # file stem users see, e.g. "atelier-job_01ab..." (A1111 prompts use it)
    metrics: dict[str, Any] | None = None


def exporter(method: str, format: str) -> Any:
    """The function writing `format` for `method`, named by the method's catalogue entry."""
    module, function = CATALOGUE[method].export(format).exporter.split(":")
    return getattr(importlib.import_module(module), function)


def write_exports(
    method: str, artifact_dir: Path, ctx: ExportContext
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every format `method` offers, under artifact_dir/exports/<format>/.

    Returns ({format: file names relative to artifact_dir}, {format: error message}).
    """
    written: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    for format in FORMATS[method]:
        out_dir = artifact_dir / EXPORTS_DIR / format
        try:
            names = exporter(method, format)(artifact_dir, out_dir, ctx)
        except Exception as exc:  # the primary artifact stands; the manifest says what failed
            log.exception("export %s of a %s artifact failed", format, method)
            shutil.rmtree(out_dir, ignore_errors=True)
            failed[format] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        written[format] = [f"{EXPORTS_DIR}/{format}/{name}" for name in names]
    return written, failed
