"""/healthz: the process is up. /readyz: the database, the broker and storage answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, StorageDep
from worker.app import get_celery

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


def _check_broker() -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


@router.get("/readyz")
def readyz(session: SessionDep, storage: StorageDep) -> JSONResponse:
    checks: dict[str, str] = {}
    probes = {
        "database": lambda: session.execute(text("SELECT 1")),
        "broker": _check_broker,
        "storage": storage.check,
    }
    for name, probe in probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; the message says which
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )
