"""The artifact manifest: what was trained, from what, with which libraries, and each file's sha256.

`manifest.json` is written last, after every artifact file is complete: no manifest, no artifact.
Readers (download, inference) call `verify_manifest` before trusting the files. Torch-free, so the API
can serve and check manifests without the ML stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_LIBRARIES = ("torch", "diffusers", "peft", "transformers", "safetensors", "atelier")
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact folder that is incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _artifact_files(artifact_dir: Path) -> list[Path]:
    return sorted(path for path in artifact_dir.rglob("*") if path.is_file() and path.name != MANIFEST_NAME)


def write_manifest(
    artifact_dir: Path,
    *,
    method: str,
    base_model: str,
    base_family: str,
    params: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
    artifact_format: str = "diffusers",
    exports: dict[str, list[str]] | None = None,
    export_errors: dict[str, str] | None = None,
    base_architecture: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in `artifact_dir` and write manifest.json beside them (atomically, last)."""
    files = [
        {
            "name": path.relative_to(artifact_dir).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for path in _artifact_files(artifact_dir)
    ]
    if not files:
        raise ArtifactError(f"{artifact_dir}: no artifact files to describe")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "method": method,
        "format": artifact_format,
        "base_model": {"id": base_model, "family": base_family},
        # core.bases.allow_list.architecture_of_folder of the base trained on: generation requests on
        # another base of the same family and architecture may use the artifact.
        "base_architecture": base_architecture,
        "files": files,
        # Other tools' formats of the same weights: {format: [file names]} (core/exports).
        "exports": exports or {},
        "export_errors": export_errors or {},
        "params": params,
        "training": training,
        "metrics": metrics,
        "libraries": library_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # Write-then-rename: a crash mid-write must not leave a manifest that names complete files.
    tmp = artifact_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, artifact_dir / MANIFEST_NAME)
    return manifest


def primary_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's file entries that make the artifact itself, leaving out the exports (other
    tools' formats of the same weights, listed under `exports`): what generation reads and what a
    `format=diffusers` download offers."""
    exported = {name for names in (manifest.get("exports") or {}).values() for name in names}
    return [entry for entry in manifest.get("files") or [] if entry.get("name") not in exported]


def content_key(manifest: dict[str, Any]) -> str | None:
    """sha256 over the (name, sha256) of the files generation reads: equal for artifacts with the
    same content, different as soon as one file differs. None for a manifest without hashes."""
    entries = []
    for entry in primary_files(manifest):
        name, digest = str(entry.get("name", "")), entry.get("sha256")
        if not name or not isinstance(digest, str):
            return None
        entries.append([name, digest])
    if not entries:
        return None
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def local_copies_root(model_cache: Path) -> Path:
    return model_cache / "artifacts"


def local_copy(model_cache: Path, artifact_id: str, manifest: dict[str, Any]) -> Path:
    """Where a generate worker keeps an artifact's files (core.generation.inference.artifact_dir): one folder
    per content (`content_key`), or per artifact id for a manifest without hashes."""
    return local_copies_root(model_cache) / (content_key(manifest) or artifact_id)


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no {MANIFEST_NAME}, so the artifact is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ArtifactError(f"{path}: no file list")
    return manifest


def verify_manifest(artifact_dir: Path) -> dict[str, Any]:
    """Return the manifest after checking every listed file's size and sha256; raise ArtifactError."""
    manifest = read_manifest(artifact_dir)
    root = artifact_dir.resolve()
    for entry in manifest["files"]:
        name = str(entry.get("name", ""))
        path = (artifact_dir / name).resolve()
        # A manifest is data: a name must not lead outside the artifact folder.
        if not path.is_relative_to(root) or path == root:
            raise ArtifactError(f"{artifact_dir}: manifest names a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir}: missing artifact file {name!r}")
        if path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(f"{artifact_dir}: {name!r} has the wrong size")
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{artifact_dir}: {name!r} does not match its sha256")
    return manifest
