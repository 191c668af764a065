"""Faults on the full stack (issue 11): the API process killed mid-upload leaves no half-written
dataset. Each case checks what a user relies on: no job lost, none run or stored twice, none stuck,
and prints how long the stack took to recover (tests/fault_injection.py records it in recovery.json
under the test's folder).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from cli.client import ApiProblem, AtelierClient
from cli.demo import make_dataset_zip
from tests import fault_fixtures as fixtures
from tests.fault_fixtures import direct_db, job_body, wait_for
from tests.fault_injection import RecoveryLog
from tests.s3_server import S3Server
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The stack and its private Redis (tests/fault_fixtures.py), shared by assignment.
recovery, private_redis, redis_url, stack = (
    fixtures.recovery,
    fixtures.private_redis,
    fixtures.redis_url,
    fixtures.stack,
)


# --- the API killed mid-upload -------------------------------------------------------------------------


def _dataset_rows(stack: Stack) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(direct_db(stack)) as conn:
        rows = conn.execute("SELECT id, status, error_code FROM datasets ORDER BY created_at").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _dataset_keys(s3_server: S3Server, stack: Stack, dataset_id: str | None = None) -> list[str]:
    client = s3_server.client()
    try:
        listing = client.list_objects_v2(Bucket=stack.env["ATELIER_S3_BUCKET"], Prefix="tenants/")
    except client.exceptions.NoSuchBucket:
        return []  # the API makes its bucket when it first stores something
    keys = [item["Key"] for item in listing.get("Contents", [])]
    return [k for k in keys if "/datasets/" in k and (dataset_id is None or f"/{dataset_id}/" in k)]


def _kill_api(stack: Stack) -> None:
    api = stack.processes["api"]
    os.killpg(api.pid, signal.SIGKILL)
    api.wait(timeout=10)


def _multipart(zip_path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{zip_path.name}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    return head + zip_path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), boundary


def test_api_killed_mid_upload_leaves_no_half_written_dataset(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    # An upload still validating this long after it began was cut off: the beat cleans it up.
    stack.env["ATELIER_DATASET_UPLOAD_TIMEOUT_S"] = "20"
    stack.start_api()
    stack._spawn(
        "worker-maintenance", "worker", "--queues", "maintenance", "--beat", "--max-tasks-per-child", "0"
    )
    stack.wait_consuming("worker-maintenance")
    client = stack.client("acme")
    archive = make_dataset_zip(tmp_path / "big.zip", count=300)

    # 1. Killed while the request body streams in: nothing was stored, no row exists.
    body, boundary = _multipart(archive)
    half_sent, killed = threading.Event(), threading.Event()

    def trickle() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        half_sent.set()
        killed.wait(30)
        yield body[len(body) // 2 :]

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server dies under it
            client.http.post(
                "/v1/datasets",
                content=trickle(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )

    sender = threading.Thread(target=send)
    sender.start()
    assert half_sent.wait(30)
    time.sleep(0.5)
    _kill_api(stack)
    killed.set()
    sender.join(30)
    assert _dataset_rows(stack) == [] and _dataset_keys(s3_server, stack) == []
    stack.start_api(same_port=True)

    # 2. Killed while the server stores the accepted images: a row and some objects exist.
    uploader = threading.Thread(target=lambda: _upload_ignoring_errors(client, archive))
    uploader.start()

    def half_written() -> str | None:
        rows = [r for r in _dataset_rows(stack) if r[1] == "validating"]
        return rows[0][0] if rows and _dataset_keys(s3_server, stack, rows[0][0]) else None

    interrupted = wait_for("the upload to be half stored", half_written, stack, timeout_s=60)
    _kill_api(stack)
    killed_at = time.monotonic()
    uploader.join(30)
    assert _dataset_keys(s3_server, stack, interrupted), "the kill came after the upload ended"
    stack.start_api(same_port=True)
    api_back = time.monotonic() - killed_at

    # The retry succeeds at once, while the beat cleans up the interrupted one.
    retried = client.upload_dataset([archive])
    assert retried["status"] == "ready" and retried["image_count"] == 300
    retry_done = time.monotonic() - killed_at

    def cleaned() -> bool:
        statuses = {r[0]: r for r in _dataset_rows(stack)}
        return statuses[interrupted][1] == "invalid" and not _dataset_keys(s3_server, stack, interrupted)

    wait_for("the interrupted upload to be cleaned up", cleaned, stack, timeout_s=120)
    swept = time.monotonic() - killed_at
    rows = {r[0]: r for r in _dataset_rows(stack)}
    assert rows == {
        interrupted: (interrupted, "invalid", "upload_interrupted"),
        retried["id"]: (retried["id"], "ready", None),
    }
    seen = client.dataset(interrupted)
    assert seen["status"] == "invalid"
    with pytest.raises(ApiProblem) as refused:  # never trainable
        client.create_job(job_body(interrupted))
    assert refused.value.body["code"] == "dataset_not_ready"
    assert len(_dataset_keys(s3_server, stack, retried["id"])) > 300  # images, captions, manifest
    recovery.record(
        "api_killed_mid_upload",
        "killed mid-body: nothing stored; killed mid-store: row and partial objects, swept to "
        "invalid/upload_interrupted with no objects; the retried upload succeeded",
        api_restarted=api_back,
        retry_succeeded=retry_done,
        interrupted_upload_cleaned=swept,
    )


def _upload_ignoring_errors(client: AtelierClient, archive: Path) -> None:
    with contextlib.suppress(ApiProblem, httpx.HTTPError):  # the server dies under it
        client.upload_dataset([archive])
