"""How a worker ends (design.md §10): within a bounded time after SIGTERM or SIGINT, with no child
left behind, and with its running job handed back to resume from the newest checkpoint, or its
running generation handed back to start over on the next worker.

Celery's warm shutdown waits for running tasks to finish, hours for a training job. Here, the first
signal also reaches the pool processes: a training attempt stops at its next progress report (every
two seconds or less) and hands its job back (core/jobs/runner.py); a generation stops at its next
denoising step and is handed back (core/generation/handback.py). After `shutdown_grace_s`, or at a
second signal, the worker kills what is left, hands back the jobs and generations those processes
held, and exits even if Celery is still waiting (billiard can block for ever at exit on a pool whose
child died).
Every child also dies with its parent (PR_SET_PDEATHSIG), so a killed worker leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from core.config import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# After killing the pool processes, Celery has this long to finish its own shutdown.
EXIT_AFTER_KILL_S = 5.0
EX_SOFTWARE = 70


def die_with_parent(*, parent: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent (the thread that started it) exits;
    a no-op elsewhere. `parent` is the pid the caller knows, to catch a parent that died first."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
    elif os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent was gone before the request took effect


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return pids


def _kill(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


class WorkerShutdown:
    """The worker's main process: forwards the first signal to the pool, then enforces the bound."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signals = 0
        self.children: list[int] = []
        self.consumer: Any = None  # Celery's Consumer, once the worker is ready
        self._force = threading.Event()

    def on_signal(self, sig: str) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("%s again: stopping the worker now", sig)
            self._force.set()
            return
        if self.consumer is not None and self.consumer.task_consumer is not None:
            # No new work from here on. Celery's synchronous loop (the filesystem broker) drains the
            # queue once more after the signal: a job handed back just now would start again here.
            self.consumer.task_consumer.on_message = _back_to_the_queue
        # The next signal is ours alone: Celery's cold shutdown waits on the pool inside its signal
        # handler, for ever when a pool process is stuck.
        for again in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(again, lambda signum, frame: self.on_signal(signal.Signals(signum).name))
        self.children = child_pids(os.getpid())
        log.info(
            "%s: stopping; running jobs are handed back (processes %s, killed after %.0f s)",
            sig,
            self.children,
            self.settings.shutdown_grace_s,
        )
        for pid in self.children:
            _kill(pid, signal.SIGTERM)
        threading.Thread(target=self._enforce, name="shutdown-watchdog", daemon=True).start()

    def _enforce(self) -> None:
        """Acts only if the worker is still alive after the grace or at a second signal; a clean exit
        ends this daemon thread before that."""
        if not self._force.wait(self.settings.shutdown_grace_s):
            log.warning("the shutdown grace of %.0f s is over", self.settings.shutdown_grace_s)
        # Processes started since the signal (a pool replacing a finished child) are ours too.
        pids = sorted(set(self.children) | set(child_pids(os.getpid())))
        killed = [pid for pid in pids if _kill(pid, signal.SIGKILL)]
        if killed:
            log.warning("killed processes %s", killed)
        self._hand_back(pids)
        if not self._force.is_set():
            self._force.wait(EXIT_AFTER_KILL_S)
        log.warning("exiting now")
        logging.shutdown()
        os._exit(EX_SOFTWARE)

    def _hand_back(self, pids: list[int]) -> None:
        """Jobs and generations that killed or vanished pool processes still held go back to the
        queue now, not when the reaper finds their lease expired (and counts an attempt)."""
        from core.db import session_scope
        from core.generation import handback
        from core.generation import states as generations
        from core.jobs import states as jobs
        from core.jobs.runner import hand_back
        from worker.tasks import worker_id

        holders = [worker_id(pid) for pid in pids]
        try:
            with session_scope(self.settings.database_url) as session:
                held = jobs.running_on(session=session, worker_ids=holders)
            for job_id, attempt in held:
                outcome = hand_back(settings=self.settings, job_id=job_id, attempt=attempt)
                log.info("job %s attempt %s: %s", job_id, attempt, outcome)
        except Exception:
            log.exception("could not hand back the jobs of %s; the reaper re-queues them", pids)
        try:
            with session_scope(self.settings.database_url) as session:
                running = generations.running_on(session=session, worker_ids=holders)
            for generation_id, attempt in running:
                outcome = handback.hand_back(
                    settings=self.settings, generation_id=generation_id, attempt=attempt
                )
                log.info("generation %s attempt %s: %s", generation_id, attempt, outcome)
        except Exception:
            log.exception("could not hand back the generations of %s; the reaper re-queues them", pids)


def _back_to_the_queue(message: Any) -> None:
    message.reject(requeue=True)


class PoolProcessSignal:
    """SIGTERM in a pool process while it runs a task: a training attempt stops at its next report
    and hands its job back, a generation stops at its next denoising step and is handed back.
    SIGALRM's default action bounds the rest, also when no parent is left to kill it; a second
    SIGTERM ends the process at once. Between tasks billiard's handler (exit at once) applies;
    billiard installs it after the process starts, so ours goes in per task."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received = False
        self._idle: Any = None

    def __call__(self, signum: int, frame: object) -> None:
        from core.generation import heartbeat as generation_heartbeat
        from core.jobs.hooks import request_shutdown

        if self.received:
            os._exit(EX_SOFTWARE)
        self.received = True
        request_shutdown()
        generation_heartbeat.request_shutdown()
        signal.alarm(math.ceil(self.grace_s + EXIT_AFTER_KILL_S))

    def task_started(self, **_: object) -> None:
        self._idle = signal.signal(signal.SIGTERM, self)

    def task_ended(self, **_: object) -> None:
        if self._idle is not None and not self.received:
            signal.signal(signal.SIGTERM, self._idle)


def install(settings: Settings) -> WorkerShutdown:
    """Connect the shutdown behaviour to Celery's signals; call before `worker_main`."""
    shutdown = WorkerShutdown(settings)
    during_task = PoolProcessSignal(settings.shutdown_grace_s)

    def on_shutting_down(sig: str = "SIGTERM", **_: object) -> None:
        shutdown.on_signal(sig)  # sent by Celery's handler, in the main process only

    def on_ready(sender: Any = None, **_: object) -> None:
        shutdown.consumer = sender

    def on_pool_process(**_: object) -> None:
        die_with_parent(parent=os.getppid())

    # weak=False: nothing else keeps these receivers alive.
    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_process_init.connect(on_pool_process, weak=False)
    task_prerun.connect(during_task.task_started, weak=False)
    task_postrun.connect(during_task.task_ended, weak=False)
    return shutdown
