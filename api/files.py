"""URLs for stored files: presigned on S3, streamed through the API on local storage."""

from __future__ import annotations

from fastapi import Request

from core.storage.base import Storage


def file_url(storage: Storage, key: str, request: Request, *, filename: str | None = None) -> str:
    url = storage.presigned_url(key, filename=filename)
    if url is not None:
        return url
    return str(request.url_for("get_file", key=key))
