"""GET /metrics: Prometheus text format, computed from the database and the broker at each scrape.

Unauthenticated, like /healthz, for a scraper on the internal network: the labels name only
methods, statuses and queues, never a tenant, job or dataset (core/metrics.py lists every metric).
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest

from api.deps import SettingsDep
from core.metrics import AtelierCollector
from worker.app import GENERATE_QUEUE, MAINTENANCE_QUEUE, TRAIN_QUEUE

router = APIRouter(tags=["health"])
QUEUES = (TRAIN_QUEUE, GENERATE_QUEUE, MAINTENANCE_QUEUE)
# The classic text format, which every Prometheus version reads (newer prometheus_client versions
# label the same bytes 1.0.0, a version older servers refuse).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {TEXT_FORMAT: {}}, "description": "Prometheus text format"}},
)
def metrics(settings: SettingsDep) -> Response:
    # A registry per scrape: the collector holds no state, and per-process counters would disagree
    # between the API's processes anyway.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        AtelierCollector(
            database_url=settings.database_url,
            broker_url=settings.broker_url,
            broker_folder=settings.broker_folder,
            queues=QUEUES,
        )
    )
    return Response(generate_latest(registry), media_type=TEXT_FORMAT)
