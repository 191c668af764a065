"""Training workers' device announcements: what the API plans jobs against (core/jobs/fitting.py).

A training worker records its device (accelerator name and memory, whether bitsandbytes imports)
when it starts and refreshes the row while it runs (worker/announce.py); a row not refreshed within
`Settings.worker_live_s` no longer counts, so a dead worker drops out without a goodbye. Torch-free:
the API reads these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.models import Worker
from core.timeutil import utcnow

# Rows of workers gone this long are deleted by the next announcement: nobody reads them.
FORGET_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str
    memory_bytes: int  # the accelerator's memory; host RAM for a CPU worker
    bitsandbytes: bool


def announce(*, session: Session, worker_id: str, hostname: str, queues: str, device: DeviceInfo) -> None:
    """Insert or refresh this worker's row (each worker writes only its own, so no race)."""
    now = utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, started_at=now)
        session.add(row)
    row.hostname, row.queues, row.last_seen = hostname, queues, now
    row.device, row.device_name = device.kind, device.name
    row.memory_bytes, row.bitsandbytes = device.memory_bytes, device.bitsandbytes
    session.execute(delete(Worker).where(Worker.last_seen < now - FORGET_AFTER))
    session.commit()


def retire(*, session: Session, worker_id: str) -> None:
    """A worker shutting down cleanly stops counting at once."""
    session.execute(delete(Worker).where(Worker.id == worker_id))
    session.commit()


def live_workers(*, session: Session, live_s: float) -> list[Worker]:
    """Workers that announced themselves within `live_s` seconds (only training workers announce)."""
    since = utcnow() - timedelta(seconds=live_s)
    return list(session.scalars(select(Worker).where(Worker.last_seen >= since).order_by(Worker.id)))
