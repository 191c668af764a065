"""Faults the full-stack tests inject without touching the machine's shared services: a TCP relay
that can be cut (PostgreSQL or the S3 server "goes away" for the stack behind it only), a private
Redis that can be restarted empty, and a record of each case's recovery time."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from tests.service_stack import free_port


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed server's kernel answers, not a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes the relay thread blocked reading it
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.close()


class CuttableRelay:
    """Relays 127.0.0.1:`port` to `target`. `cut()` resets every open connection and resets each
    new one at once (counted in `refused`), until `restore()`: to the processes it looks exactly
    like the server died and came back on the same address."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.refused = 0
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            victims, self._open = self._open, set()
        for sock in victims:
            _reset(sock)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._thread.join()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()


class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence: `restart()` brings it
    back empty, as a Redis without AOF comes back after a crash."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"redis-server did not start:\n{(self.folder / 'redis.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a crash: nothing is saved
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RecoveryLog:
    """Each fault's outcome and recovery time (seconds from the fault cleared to the job going on),
    written as JSON under the test's folder and printed (`pytest -s` shows it)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "recovery.json"

    def record(self, case: str, what_happened: str, **seconds: float) -> None:
        rounded = {name: round(value, 1) for name, value in seconds.items()}
        entries = json.loads(self.path.read_text()) if self.path.exists() else []
        entries.append({"case": case, "what_happened": what_happened, **rounded})
        self.path.write_text(json.dumps(entries, indent=2))
        timings = ", ".join(f"{name} {value} s" for name, value in rounded.items())
        print(f"\nFAULT {case}: {what_happened}; {timings}")
