"""The lease of a running generation: a thread renews it while the attempt loads, denoises and
stores, and learns from the row whether the user canceled or the reaper took the generation back.
The attempt reads `stop_reason` at every denoising step (`check`) and before it stores (`confirm`);
`check` also stops it when its worker shuts down (`request_shutdown`), to be handed back."""

from __future__ import annotations

import contextvars
import logging
import threading

from core.config import Settings
from core.db import session_scope
from core.generation import states

log = logging.getLogger(__name__)

CANCELED = "canceled"
LEASE_LOST = "lease_lost"
SHUTDOWN = "worker_shutdown"

# Set in a generate worker's pool process when its worker shuts down (worker/lifecycle.py, from a
# signal handler); an Event is safe to set there and to read from the attempt's thread.
_shutdown = threading.Event()


def request_shutdown() -> None:
    _shutdown.set()


class GenerationStopped(Exception):
    """The attempt must stop: `reason` is CANCELED, LEASE_LOST or SHUTDOWN."""

    def __init__(self, generation_id: str, reason: str) -> None:
        super().__init__(f"generation {generation_id} stopped: {reason}")
        self.reason = reason


class GenerationHeartbeat(threading.Thread):
    def __init__(self, *, settings: Settings, generation_id: str, attempt: int) -> None:
        super().__init__(name=f"heartbeat-{generation_id}", daemon=True)
        self.settings, self.generation_id, self.attempt = settings, generation_id, attempt
        # A thread starts with an empty context: carry the creator's, so its logs name the generation.
        self._context = contextvars.copy_context()
        self.stop_reason: str | None = None
        self._done = threading.Event()

    def beat(self) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                canceled = states.heartbeat(
                    session=session,
                    generation_id=self.generation_id,
                    attempt=self.attempt,
                    lease_s=self.settings.lease_s,
                )
        except states.LeaseLost:
            self.stop_reason = LEASE_LOST
            return
        except Exception:
            # A database blip must not end the generation: the lease has slack for a few missed beats.
            log.warning("heartbeat for generation %s failed; retrying", self.generation_id, exc_info=True)
            return
        if canceled and self.stop_reason is None:
            self.stop_reason = CANCELED

    def run(self) -> None:
        self._context.run(self._beat_until_stopped)

    def _beat_until_stopped(self) -> None:
        while not self._done.wait(self.settings.heartbeat_s):
            self.beat()

    def stop(self) -> None:
        self._done.set()

    def check(self) -> None:
        """At a denoising step: raise GenerationStopped when the last heartbeat said to stop, or
        when the worker is shutting down."""
        self._stop_if_told()
        if _shutdown.is_set():
            raise GenerationStopped(self.generation_id, SHUTDOWN)

    def confirm(self) -> None:
        """Renew the lease now and stop unless it still holds and nobody canceled: the attempt is
        about to store its images, and only the lease's holder may. A shutdown no longer stops it:
        its images are made, and storing them takes less than another attempt would."""
        self.beat()
        self._stop_if_told()

    def _stop_if_told(self) -> None:
        if self.stop_reason is not None:
            raise GenerationStopped(self.generation_id, self.stop_reason)
