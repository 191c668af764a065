"""Server roles: the API (`serve`), Celery workers (`worker`), the reaper schedule (`beat`).

In the embedded default `serve` also starts one worker child process (with the beat schedule in
it) on the filesystem broker, so one command runs the whole service with no other services.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from core.config import Settings, get_settings
from core.db import upgrade

log = logging.getLogger(__name__)


def spawn_worker(
    *, queues: str, beat: bool, max_tasks_per_child: int, log_file: Path | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "worker", "--queues", queues]
    cmd += ["--max-tasks-per-child", str(max_tasks_per_child)]
    if beat:
        cmd.append("--beat")
    out = log_file.open("ab") if log_file else None
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)


def run_api(*, host: str, port: int, with_worker: bool) -> None:
    import uvicorn

    from api.main import create_app

    settings = get_settings()
    upgrade(settings.database_url)
    children = []
    if with_worker and settings.embedded_broker:
        settings.home.mkdir(parents=True, exist_ok=True)
        log_file = settings.home / "worker.log"
        # Training gets a fresh process per job; generation and the reaper keep theirs, so the
        # reaper still runs while a long job trains.
        children.append(spawn_worker(queues="train", beat=False, max_tasks_per_child=1, log_file=log_file))
        children.append(
            spawn_worker(queues="generate,maintenance", beat=True, max_tasks_per_child=0, log_file=log_file)
        )
        log.info("embedded workers started, log %s", log_file)
    try:
        # log_config=None: uvicorn keeps the JSON logging configured at startup (core/logs.py).
        uvicorn.run(create_app(), host=host, port=port, log_level="info", log_config=None)
    finally:
        _stop(children)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()


def run_worker(
    *,
    queues: str,
    concurrency: int = 1,
    max_tasks_per_child: int | None = 1,
    beat: bool = False,
    loglevel: str = "INFO",
    settings: Settings | None = None,
) -> None:
    """One job per process by default: a fresh child per task frees all (GPU) memory afterwards."""
    from worker.announce import Announcer
    from worker.app import TRAIN_QUEUE, get_celery

    settings = settings or get_settings()
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
