"""The one place that picks a storage backend from settings."""

from __future__ import annotations

from core.config import Settings
from core.storage.base import Storage
from core.storage.local import LocalStorage


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        from core.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    assert settings.storage_root is not None
    return LocalStorage(settings.storage_root)
