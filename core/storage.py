"""Storage: bytes in and out, one interface over S3 (boto3) and the local filesystem.

Keys are '/'-separated and always derived by the server (`tenants/{tid}/...`, `jobs/{id}/...`);
user-supplied names never become keys. Writes are atomic per key: a reader sees the old object or
the whole new one, never a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from core.config import Settings

CHUNK = 1024 * 1024


class StorageError(Exception):
    """A storage backend failed (unreachable, denied); callers treat it as transient."""


class ObjectNotFound(StorageError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object at {key!r}")
        self.key = key


class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None: ...
    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO, *, content_type: str | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]:
        """Sorted keys below the folder `prefix`: 'jobs/1' and 'jobs/1/' both mean everything under
        jobs/1/ and never jobs/10/...; '' lists the whole store."""
        ...

    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int:
        """Delete what list(prefix) returns and count it; an empty prefix is refused."""
        ...

    def presigned_url(self, key: str, *, expires_s: int = 900, filename: str | None = None) -> str | None:
        """A time-limited GET URL, or None where the backend cannot make one (the API then streams)."""
        ...

    def check(self) -> None:
        """Raise StorageError when the backend is unusable (for /readyz)."""
        ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _folder_prefix(prefix: str, *, allow_root: bool) -> str:
    """Prefixes name folders, not string starts: a raw S3 prefix 'jobs/1' would also match
    jobs/10/..., and delete_prefix(f"jobs/{id}") would then delete other jobs' files."""
    if not prefix:
        if not allow_root:
            raise ValueError("an empty prefix would mean every object")
        return ""
    return _check_key(prefix.removesuffix("/")) + "/"


def upload_dir(
    storage: Storage,
    local_dir: Path,
    prefix: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Upload every file below local_dir under prefix; returns the keys in upload order.
    `on_progress(done, total)` counts files."""
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
    keys: list[str] = []
    for path in paths:
        if on_progress is not None:
            on_progress(len(keys), len(paths))
        key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
        storage.put_file(key, path)
        keys.append(key)
    if on_progress is not None:
        on_progress(len(keys), len(paths))
    return keys


def download_prefix(
    storage: Storage,
    prefix: str,
    local_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Download every object under prefix into local_dir, keeping relative paths;
    `on_progress(done, total)` counts files."""
    prefix = prefix.rstrip("/") + "/"
    keys = list(storage.list(prefix))
    paths: list[Path] = []
    for key in keys:
        if on_progress is not None:
            on_progress(len(paths), len(keys))
        dest = local_dir / key[len(prefix) :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(key, dest)
        paths.append(dest)
    if on_progress is not None:
        on_progress(len(paths), len(keys))
    return paths


class LocalStorage:
    """The embedded default: objects are files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _write_atomic(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        self._write_atomic(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        with open(path, "rb") as src:
            self._write_atomic(key, lambda out: shutil.copyfileobj(src, out, CHUNK))

    def put_stream(self, key: str, stream: BinaryIO, *, content_type: str | None = None) -> None:
        self._write_atomic(key, lambda out: shutil.copyfileobj(stream, out, CHUNK))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with src:
            while chunk := src.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        folder = self.root / _folder_prefix(prefix, allow_root=True)
        if not folder.is_dir():
            return []
        files = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
        return sorted(p.relative_to(self.root).as_posix() for p in files)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(_folder_prefix(prefix, allow_root=False))
        for key in keys:
            self.delete(key)
        return len(keys)

    def presigned_url(self, key: str, *, expires_s: int = 900, filename: str | None = None) -> str | None:
        _check_key(key)  # a bad key is a bug on every backend, even where no URL comes back
        return None

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage root {self.root} is not writable")


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        from core.s3_storage import S3Storage

        return S3Storage.from_settings(settings)
    assert settings.storage_root is not None
    return LocalStorage(settings.storage_root)
