"""Storage: bytes in and out, one interface over S3 (boto3) and the local filesystem.

Keys are '/'-separated and always derived by the server (`tenants/{tid}/...`, `jobs/{id}/...`);
user-supplied names never become keys. Writes are atomic per key: a reader sees the old object or
the whole new one, never a half-written file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

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
