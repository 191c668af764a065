"""Server roles: the API (`serve`), Celery workers (`worker`), the reaper schedule (`beat`).

In the embedded default `serve` also starts one worker child process (with the beat schedule in
it) on the filesystem broker, so one command runs the whole service with no other services.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from core.config import Settings, get_settings
from core.db import upgrade

log = logging.getLogger(__name__)

# Open connections (event streams) get this long after a signal before the API closes them.
HTTP_GRACE_S = 5.0
# A worker that outlives its own bound (grace + kill + exit) by this much is killed with its group.
WORKER_MARGIN_S = 10.0


def spawn_worker(
    *, queues: str, beat: bool, max_tasks_per_child: int, log_file: Path | None = None
) -> subprocess.Popen:
    """A worker in its own process group (the API signals it, not the terminal) that dies with us."""
    cmd = [sys.executable, "-m", "cli.main", "worker", "--queues", queues]
    cmd += ["--max-tasks-per-child", str(max_tasks_per_child), "--parent-pid", str(os.getpid())]
    if beat:
        cmd.append("--beat")
    out = log_file.open("ab") if log_file else None
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, process_group=0)


class EmbeddedWorkers:
    """The worker processes `serve` starts: the first signal asks them to stop (each hands its running
    job back), a second forces them, and whatever outlives the bound is killed with its group."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.processes: list[subprocess.Popen] = []
        self.deadline: float | None = None

    def add(self, process: subprocess.Popen) -> None:
        self.processes.append(process)
        if self.deadline is not None:  # a signal came while the workers were starting
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def signal_all(self, sig: signal.Signals) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def stop(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s + WORKER_MARGIN_S
            self.signal_all(signal.SIGTERM)

    def force(self) -> None:
        self.signal_all(signal.SIGTERM)  # a worker's second signal: it kills its pool and exits
        self.deadline = min(self.deadline or float("inf"), time.monotonic() + WORKER_MARGIN_S)

    def wait(self) -> None:
        self.stop()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, (self.deadline or 0) - time.monotonic()))
        for process in self.processes:
            # The group too: a pool process whose worker was killed must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.returncode is None:
                log.warning("worker %s did not stop in time: killed", process.pid)
            process.wait()


@contextlib.contextmanager
def _shutdown_signals(on_signal: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_api(*, host: str, port: int, with_worker: bool) -> int:
    import uvicorn

    from api.main import create_app

    class Server(uvicorn.Server):
        # The signals are ours (below): uvicorn re-raises a caught SIGTERM once it has stopped, which
        # killed this process before it could stop the embedded workers.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    settings = get_settings()
    upgrade(settings.database_url)
    # log_config=None: uvicorn keeps the JSON logging configured at startup (core/logs.py).
    config = uvicorn.Config(
        create_app(),
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        timeout_graceful_shutdown=HTTP_GRACE_S,
    )
    server = Server(config)
    workers = EmbeddedWorkers(settings.shutdown_grace_s)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        server.should_exit = True
        if len(received) == 1:
            log.info("%s: stopping the API and the workers", signal.Signals(signum).name)
            workers.stop()  # at once, in parallel with the API's own shutdown
        else:
            log.warning("%s again: stopping now", signal.Signals(signum).name)
            server.force_exit = True
            workers.force()

    with _shutdown_signals(on_signal):
        try:
            if with_worker and settings.embedded_broker:
                _start_embedded_workers(settings, workers)
            server.run()
        finally:
            workers.wait()
    return 1 if len(received) > 1 else 0


def _start_embedded_workers(settings: Settings, workers: EmbeddedWorkers) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    log_file = settings.home / "worker.log"
    # Training gets a fresh process per job; generation and the reaper keep theirs, so the reaper
    # still runs while a long job trains.
    workers.add(spawn_worker(queues="train", beat=False, max_tasks_per_child=1, log_file=log_file))
    workers.add(
        spawn_worker(queues="generate,maintenance", beat=True, max_tasks_per_child=0, log_file=log_file)
    )
    log.info("embedded workers started, log %s", log_file)


def run_worker(
    *,
    queues: str,
    concurrency: int = 1,
    max_tasks_per_child: int | None = 1,
    beat: bool = False,
    loglevel: str = "INFO",
    settings: Settings | None = None,
    parent_pid: int | None = None,
) -> None:
    """One job per process by default: a fresh child per task frees all (GPU) memory afterwards.
    `parent_pid`: the `serve` that started this worker; the worker stops when it dies."""
    from worker import lifecycle
    from worker.announce import Announcer
    from worker.app import TRAIN_QUEUE, get_celery

    if parent_pid:
        lifecycle.die_with_parent(parent=parent_pid)
    settings = settings or get_settings()
    lifecycle.install(settings)
    upgrade(settings.database_url)
    argv = [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    if beat:
        settings.home.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={settings.home / 'celerybeat-schedule'}"]
    # Training workers announce their device: the API plans jobs against their memory.
    announcer = Announcer(settings, queues) if TRAIN_QUEUE in queues.split(",") else None
    if announcer:
        announcer.start()
    try:
        get_celery().worker_main(argv)
    finally:
        if announcer:
            announcer.stop()


def run_beat(*, loglevel: str = "INFO") -> None:
    from worker.app import get_celery

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    get_celery().start(
        ["beat", f"--loglevel={loglevel}", f"--schedule={settings.home / 'celerybeat-schedule'}"]
    )
