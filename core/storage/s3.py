"""S3Storage: the Storage interface over any S3-compatible service (AWS S3, MinIO, SeaweedFS).

Credentials come from boto3's standard chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a
profile, an instance role); settings carry only where the bucket is. Every botocore failure leaves
this module as `ObjectNotFound` or `StorageError`, so callers never import botocore.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError

from core.storage.base import CHUNK, ObjectNotFound, StorageError, _check_key, _folder_prefix

if TYPE_CHECKING:
    from core.config import Settings

MiB = 1024 * 1024
# Above 8 MiB uploads go multipart in 8 MiB parts (S3's minimum part is 5 MiB): a failed part is
# retried alone, and checkpoints of several GB never sit whole in memory.
TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
DELETE_BATCH = 1000  # the most keys one DeleteObjects request accepts
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BUCKET_MINE = {"BucketAlreadyOwnedByYou"}


class S3Storage:
    """Objects in one bucket; keys are the same '/'-separated keys LocalStorage uses as paths."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        session: boto3.session.Session | None = None,
        max_attempts: int = 5,
        public_endpoint_url: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.region = region
        config = Config(
            region_name=region,
            # Path style works with MinIO and SeaweedFS behind a plain host name, where
            # virtual-host style would need wildcard DNS for bucket subdomains.
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": max_attempts},
            # /readyz calls check(): an unreachable endpoint must fail in seconds, not minutes.
            connect_timeout=5,
        )
        # One client per instance: clients are thread-safe, sessions are not.
        session = session or boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs are for the users' machines: SigV4 signs the host, so they are signed for
        # the address users reach (e.g. http://localhost:9000 when the services talk to minio:9000).
        self._signer = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        storage = cls(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
        if settings.s3_create_bucket:
            storage.ensure_bucket()
        return storage

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; a bucket we already own is success, not a conflict."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if _code(e) not in _BUCKET_MINE:
                raise _storage_error(e, f"cannot create bucket {self.bucket!r}") from e
        except (BotoCoreError, Boto3Error) as e:
            raise _storage_error(e, f"cannot create bucket {self.bucket!r}") from e

    @contextmanager
    def _translate(self, key: str, action: str) -> Iterator[None]:
        """Turn botocore's and s3transfer's exceptions into the Storage errors."""
        try:
            yield
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise _storage_error(e, f"cannot {action} {key!r} in bucket {self.bucket!r}") from e
        except (BotoCoreError, Boto3Error, RetriesExceededError) as e:
            raise _storage_error(e, f"cannot {action} {key!r} in bucket {self.bucket!r}") from e

    def _upload(self, key: str, stream: BinaryIO, content_type: str | None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        with self._translate(_check_key(key), "upload"):
            self._client.upload_fileobj(stream, self.bucket, key, ExtraArgs=extra, Config=TRANSFER)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        self._upload(key, io.BytesIO(data), content_type)

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        with open(path, "rb") as src:
            self._upload(key, src, content_type)

    def put_stream(self, key: str, stream: BinaryIO, *, content_type: str | None = None) -> None:
        self._upload(key, stream, content_type)

    def get_bytes(self, key: str) -> bytes:
        with self._translate(_check_key(key), "read"):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_file(self, key: str, path: Path) -> None:
        # Download beside the destination and rename: a reader of `path` never sees half a file,
        # and a failed download leaves no file at all.
        _check_key(key)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, self._translate(key, "download"):
                self._client.download_fileobj(self.bucket, key, out, Config=TRANSFER)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        # A read can fail mid-stream (reset, timeout); that too must surface as StorageError.
        with self._translate(_check_key(key), "read"):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with body:
                yield from body.iter_chunks(chunk_size)

    def _head(self, key: str) -> dict[str, Any]:
        with self._translate(_check_key(key), "inspect"):
            return self._client.head_object(Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _iter_keys(self, folder: str) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
        with self._translate(folder, "list"):
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]

    def list(self, prefix: str) -> list[str]:
        # S3 already returns keys in UTF-8 byte order; sorting keeps the contract explicit.
        return sorted(self._iter_keys(_folder_prefix(prefix, allow_root=True)))

    def delete(self, key: str) -> None:
        with self._translate(_check_key(key), "delete"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(_folder_prefix(prefix, allow_root=False))
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
            with self._translate(prefix, "delete under"):
                result = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            # DeleteObjects answers 200 even when single keys fail; those come back in Errors.
            if errors := result.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} object(s) under {prefix!r} in bucket {self.bucket!r}, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )
        return len(keys)

    def presigned_url(self, key: str, *, expires_s: int = 900, filename: str | None = None) -> str | None:
        if not 0 < expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be within 1..{MAX_PRESIGN_S}, got {expires_s}")
        params = {"Bucket": self.bucket, "Key": _check_key(key)}
        if filename is not None:
            params["ResponseContentDisposition"] = _content_disposition(filename)
        # Signing is local (no request), but a broken credential chain still raises here.
        with self._translate(key, "sign a URL for"):
            return self._signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise _storage_error(e, f"bucket {self.bucket!r} is not usable") from e


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _storage_error(error: Exception, what: str) -> StorageError:
    """A message an operator can act on: the operation, the key or bucket, and S3's own reason."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.response.get("Error", {}).get("Message", "")
        reason = f"{_code(error)} (HTTP {status}) {message}".rstrip()
    elif isinstance(error, RetriesExceededError):
        reason = f"retries exhausted: {error.last_exception}"
    else:
        reason = str(error)
    return StorageError(f"{what}: {reason}")


def _content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback for old clients plus the exact UTF-8 name in filename*."""
    name = filename.replace("/", "_").replace("\\", "_")
    fallback = "".join(c if c.isascii() and c.isprintable() and c != '"' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
