"""A training worker announces its device, so the API can plan jobs against it (core/jobs/workers.py).

The worker's main process forks the pool children that train on CUDA and must never start CUDA
itself (a CUDA context does not survive a fork), so the device is probed once in a separate
interpreter (`python -m worker.announce <device>`); a thread then refreshes the row every
`Settings.worker_announce_s` while the worker runs, and removes it on a clean shutdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from core.config import Settings
from core.db import session_scope
from core.jobs.workers import DeviceInfo, announce, retire
from worker.tasks import worker_id

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 180.0  # importing torch and starting CUDA on a busy host


def probe(device: str) -> DeviceInfo:
    """This process's training device, as a job's `pick_device` would choose it (`device`: the
    Settings.device value). Imports torch and starts CUDA: run it in a process of its own."""
    if device != "cpu":
        import torch

        if device == "cuda" or torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(torch.cuda.current_device())
            return DeviceInfo("cuda", properties.name, properties.total_memory, _bitsandbytes())
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return DeviceInfo("cpu", platform.processor() or platform.machine(), pages, False)


def _bitsandbytes() -> bool:
    # Installed is not enough: bitsandbytes can fail to import where its CUDA libraries do not match.
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def detect(settings: Settings) -> DeviceInfo | None:
    """The device, probed in a child interpreter; None (and a warning) when the probe fails."""
    if settings.device == "cpu":
        return probe("cpu")  # no torch needed
    command = [sys.executable, "-m", "worker.announce", settings.device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=True)
        return DeviceInfo(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError, IndexError) as exc:
        log.warning("could not probe this worker's device; jobs are planned without it: %s", exc)
        return None


class Announcer:
    """Announces this worker while it runs: `start()` before the worker, `stop()` after it."""

    def __init__(
        self,
        settings: Settings,
        queues: str,
        detect_device: Callable[[Settings], DeviceInfo | None] = detect,
    ) -> None:
        self.settings, self.queues, self.detect_device = settings, queues, detect_device
        self.worker_id = worker_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with session_scope(self.settings.database_url) as session:
                retire(session=session, worker_id=self.worker_id)
        except Exception:
            log.warning("could not retire worker %s; its announcement lapses by itself", self.worker_id)

    def _run(self) -> None:
        device = self.detect_device(self.settings)
        if device is None:
            return
        log.info("announcing worker %s: %s", self.worker_id, device)
        while not self._stop.is_set():
            try:
                with session_scope(self.settings.database_url) as session:
                    announce(
                        session=session,
                        worker_id=self.worker_id,
                        hostname=socket.gethostname(),
                        queues=self.queues,
                        device=device,
                    )
            except Exception:
                log.exception("could not announce worker %s; retrying", self.worker_id)
            self._stop.wait(self.settings.worker_announce_s)


if __name__ == "__main__":
    print(json.dumps(dataclasses.asdict(probe(sys.argv[1] if len(sys.argv) > 1 else "auto"))))
