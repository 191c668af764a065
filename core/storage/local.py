"""LocalStorage: the embedded default, objects as files under one root folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from core.storage.base import CHUNK, ObjectNotFound, StorageError, _check_key, _folder_prefix


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
