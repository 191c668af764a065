"""One contract for every Storage backend, run on LocalStorage and on S3Storage against a real S3
server (tests/s3_server.py), followed by what only S3 has: multipart, presigned URLs, SigV4."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest

from core.config import Settings
from core.storage.base import ObjectNotFound, Storage, StorageError
from core.storage.factory import make_storage
from core.storage.local import LocalStorage
from core.storage.s3 import S3Storage
from tests.s3_server import S3Server

MiB = 1024 * 1024
BAD_KEYS = ["", "/abs", "a//b", "a/../b", "./a", "a/.", "a\\b", "a/"]
BAD_PREFIXES = ["/", "/abs", "a//b", "..", "a/../b", "a\\b", "jobs//"]


def _fresh_bucket(settings: Settings) -> Settings:
    """Each test gets its own bucket: list('') and delete_prefix see only that test's objects."""
    return settings.model_copy(update={"s3_bucket": f"t-{uuid.uuid4().hex[:20]}"})


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    s3_settings: Settings = request.getfixturevalue("s3_settings")
    return S3Storage.from_settings(_fresh_bucket(s3_settings))


@pytest.fixture
def s3(s3_settings: Settings) -> S3Storage:
    return S3Storage.from_settings(_fresh_bucket(s3_settings))


class OneWayStream(io.RawIOBase):
    """A pipe-like stream (no seek, no len), as an upload request body is."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- the contract, on both backends ----


def test_bytes_round_trip_and_overwrite(storage: Storage) -> None:
    storage.put_bytes("jobs/1/a.txt", b"first", content_type="text/plain")
    storage.put_bytes("jobs/1/a.txt", b"second")
    storage.put_bytes("jobs/1/empty", b"")

    assert storage.get_bytes("jobs/1/a.txt") == b"second"
    assert storage.get_bytes("jobs/1/empty") == b""
    assert storage.size("jobs/1/empty") == 0


def test_large_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))  # above the 8 MiB multipart threshold of S3Storage
    dest = tmp_path / "out" / "big.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")  # get_file replaces what is there

    storage.put_file("jobs/1/checkpoints/model.safetensors", src)
    storage.get_file("jobs/1/checkpoints/model.safetensors", dest)

    assert storage.size("jobs/1/checkpoints/model.safetensors") == 12 * MiB
    assert _sha256(dest) == _sha256(src)
    assert os.listdir(dest.parent) == ["big.bin"]  # no temporary file left beside it


def test_put_stream_reads_a_one_way_stream(storage: Storage) -> None:
    data = os.urandom(9 * MiB + 7)  # multipart on S3, with a short last part

    storage.put_stream("datasets/7/upload.zip", io.BufferedReader(OneWayStream(data)))

    assert storage.get_bytes("datasets/7/upload.zip") == data


def test_iter_chunks(storage: Storage) -> None:
    data = os.urandom(3 * 1000 + 5)
    storage.put_bytes("a/b", data)

    chunks = list(storage.iter_chunks("a/b", chunk_size=1000))

    assert b"".join(chunks) == data
    assert all(len(c) <= 1000 for c in chunks)


def test_exists_and_size(storage: Storage) -> None:
    assert not storage.exists("a/b")
    storage.put_bytes("a/b", b"12345")

    assert storage.exists("a/b")
    assert storage.size("a/b") == 5
    assert not storage.exists("a")  # a folder is not an object


def test_list_takes_folders_not_string_prefixes(storage: Storage) -> None:
    keys = ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/2/d", "top.txt", "x/b-c", "x/b/c"]
    for key in keys:
        storage.put_bytes(key, key.encode())

    assert storage.list("jobs/1") == ["jobs/1/a", "jobs/1/sub/b"]
    assert storage.list("jobs/1/") == ["jobs/1/a", "jobs/1/sub/b"]
    assert storage.list("jobs") == ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/2/d"]
    assert storage.list("") == sorted(keys)  # code-point order, which is S3's UTF-8 byte order
    assert storage.list("jobs/3") == []
    assert storage.list("jobs/1/a") == []  # an object is not a folder


def test_delete_and_delete_prefix(storage: Storage) -> None:
    for key in ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c"]:
        storage.put_bytes(key, b"x")

    storage.delete("jobs/1/a")
    storage.delete("jobs/1/a")  # deleting what is gone is not an error

    assert not storage.exists("jobs/1/a")
    assert storage.delete_prefix("jobs/1") == 1
    assert storage.list("") == ["jobs/10/c"]  # jobs/10 is another job: untouched
    assert storage.delete_prefix("jobs/1") == 0
    with pytest.raises(ValueError):
        storage.delete_prefix("")


def test_missing_keys_raise_object_not_found(storage: Storage, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(ObjectNotFound) as caught:
        storage.get_bytes("no/such")
    assert caught.value.key == "no/such"
    assert isinstance(caught.value, StorageError)
    with pytest.raises(ObjectNotFound):
        storage.get_file("no/such", downloads / "dest.bin")
    with pytest.raises(ObjectNotFound):
        list(storage.iter_chunks("no/such"))
    with pytest.raises(ObjectNotFound):
        storage.size("no/such")

    assert list(downloads.iterdir()) == []  # a failed get_file leaves nothing, not even a temp file


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected(storage: Storage, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls = [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.put_file(key, src),
        lambda: storage.put_stream(key, io.BytesIO(b"x")),
        lambda: storage.get_bytes(key),
        lambda: storage.get_file(key, tmp_path / "never-written"),
        lambda: list(storage.iter_chunks(key)),
        lambda: storage.exists(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.presigned_url(key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert storage.list("") == []


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
def test_invalid_prefixes_are_rejected(storage: Storage, prefix: str) -> None:
    with pytest.raises(ValueError):
        storage.list(prefix)
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)


def test_check_passes_on_a_usable_backend(storage: Storage) -> None:
    storage.check()


# ---- S3 only ----


def test_from_settings_creates_the_bucket_once(s3_settings: Settings, s3_server: S3Server) -> None:
    settings = _fresh_bucket(s3_settings)

    first = make_storage(settings)
    make_storage(settings)  # "already owned by you" is success

    assert isinstance(first, S3Storage)
    assert settings.s3_bucket in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}


def test_large_uploads_go_multipart(s3: S3Storage, s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    s3.put_file("a/big.bin", src, content_type="application/octet-stream")
    s3.put_bytes("a/small.txt", b"hi", content_type="text/plain")

    big = s3_server.client().head_object(Bucket=s3.bucket, Key="a/big.bin")
    small = s3_server.client().head_object(Bucket=s3.bucket, Key="a/small.txt")

    assert big["ETag"].strip('"').endswith("-2")  # a multipart ETag counts its parts
    assert small["ContentType"] == "text/plain"


def test_delete_prefix_batches_past_1000_keys(s3: S3Storage) -> None:
    keys = [f"jobs/5/samples/{i:05d}.png" for i in range(1001)]
    with ThreadPoolExecutor(8) as pool:  # one shared client: S3Storage must be thread-safe
        list(pool.map(lambda key: s3.put_bytes(key, b""), keys))
    s3.put_bytes("jobs/50/keep", b"")

    assert s3.list("jobs/5") == keys  # the listing spans two pages of 1000
    assert s3.delete_prefix("jobs/5") == 1001
    assert s3.list("") == ["jobs/50/keep"]


def test_presigned_url_works_with_a_plain_http_client(s3: S3Storage) -> None:
    s3.put_bytes("jobs/1/out/image.png", b"\x89PNG...")

    plain = httpx.get(s3.presigned_url("jobs/1/out/image.png", expires_s=60))
    named = httpx.get(s3.presigned_url("jobs/1/out/image.png", filename='cat "1" é.png'))

    assert plain.status_code == 200 and plain.content == b"\x89PNG..."
    assert named.status_code == 200
    assert named.headers["content-disposition"] == (
        "attachment; filename=\"cat _1_ _.png\"; filename*=UTF-8''cat%20%221%22%20%C3%A9.png"
    )


def test_presigned_url_is_signed_and_expires(s3: S3Storage) -> None:
    s3.put_bytes("a/b", b"secret")
    url = s3.presigned_url("a/b", expires_s=1)
    tampered = s3.presigned_url("a/b").replace("/a/b?", "/a/c?")

    assert httpx.get(tampered).status_code == 403
    time.sleep(2.1)
    assert httpx.get(url).status_code == 403
    with pytest.raises(ValueError):
        s3.presigned_url("a/b", expires_s=8 * 24 * 3600)  # SigV4's limit is 7 days


def test_presigned_urls_use_the_public_endpoint(s3: S3Storage, s3_server: S3Server) -> None:
    """Services reach S3 at one address, users at another: the URL is signed for the users' one."""
    public = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    assert public != s3_server.endpoint_url
    storage = S3Storage(bucket=s3.bucket, endpoint_url=s3_server.endpoint_url, public_endpoint_url=public)
    storage.put_bytes("pub/x", b"public")
    url = storage.presigned_url("pub/x")
    assert url.startswith(public + "/")
    assert httpx.get(url).content == b"public"


def test_local_storage_has_no_presigned_urls(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_bytes("a/b", b"x")

    assert storage.presigned_url("a/b", filename="b.txt") is None


@pytest.fixture
def bad_secret(s3: S3Storage, s3_server: S3Server) -> S3Storage:
    s3.put_bytes("a/b", b"x")
    session = boto3.session.Session(
        aws_access_key_id=s3_server.access_key, aws_secret_access_key="not-" + s3_server.secret_key
    )
    return S3Storage(bucket=s3.bucket, endpoint_url=s3_server.endpoint_url, session=session)


def test_wrong_secret_is_refused(bad_secret: S3Storage) -> None:
    """SigV4 is enforced: a client with a bad secret can neither read, write nor check."""
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        bad_secret.put_bytes("a/c", b"x")
    with pytest.raises(StorageError) as caught:
        bad_secret.get_bytes("a/b")
    assert not isinstance(caught.value, ObjectNotFound)  # denied is not missing
    with pytest.raises(StorageError):
        bad_secret.check()
    assert httpx.get(bad_secret.presigned_url("a/b")).status_code == 403


def test_unknown_access_key_is_refused(s3: S3Storage, s3_server: S3Server) -> None:
    session = boto3.session.Session(aws_access_key_id="nobody", aws_secret_access_key=s3_server.secret_key)
    stranger = S3Storage(bucket=s3.bucket, endpoint_url=s3_server.endpoint_url, session=session)

    with pytest.raises(StorageError, match="InvalidAccessKeyId"):
        stranger.list("")


def test_check_names_a_missing_bucket(s3_settings: Settings) -> None:
    settings = _fresh_bucket(s3_settings).model_copy(update={"s3_create_bucket": False})
    storage = S3Storage.from_settings(settings)

    with pytest.raises(StorageError, match=settings.s3_bucket):
        storage.check()
    with pytest.raises(StorageError) as caught:
        storage.put_bytes("a/b", b"x")
    assert "NoSuchBucket" in str(caught.value)


def test_unreachable_endpoint_is_a_storage_error() -> None:
    session = boto3.session.Session(aws_access_key_id="any", aws_secret_access_key="any")
    storage = S3Storage(bucket="atelier", endpoint_url="http://127.0.0.1:9", session=session, max_attempts=1)

    with pytest.raises(StorageError, match=re.escape("127.0.0.1:9")):
        storage.check()
    with pytest.raises(StorageError):
        storage.get_bytes("a/b")
