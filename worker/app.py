"""The Celery app: delivery settings of design.md §4, built from Settings (never at import time).

The API imports this module only to send task names; it never imports torch.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from core import dispatch
from core.config import Settings, get_settings
from core.db import forget_engines
from core.logs import configure_logging
from worker import fs_broker

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
MAINTENANCE_QUEUE = "maintenance"
TRAIN_TASK = "atelier.train_job"
GENERATE_TASK = "atelier.generate"
REAP_TASK = "atelier.reap_stale_jobs"
WEBHOOK_TASK = "atelier.deliver_webhook"
WEBHOOK_DISPATCH_TASK = "atelier.dispatch_webhooks"


def _broker_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # exchange bindings: shared by the API and worker processes, not the working directory
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    # Redis re-delivers an unacked message after the visibility timeout; keep it above the longest
    # job so a long run is not started twice (fencing would stop the duplicate anyway).
    return {"visibility_timeout": settings.job_time_limit_s + 3600}


def make_celery(settings: Settings) -> Celery:
    app = Celery("atelier", broker=settings.broker_url, backend=settings.result_backend)
    if settings.embedded_broker:
        # kombu's own filesystem transport can lose a message to a consumer polling mid-write.
        app.conf.broker_transport = fs_broker.TRANSPORT
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.job_time_limit_s,
        # How long a dead pool process's result is waited for (default 10 s, also at shutdown). Results
        # are ignored here: the job row is the truth.
        worker_lost_wait=2.0,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=_broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_routes={
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
            GENERATE_TASK: {"queue": GENERATE_QUEUE},
            REAP_TASK: {"queue": MAINTENANCE_QUEUE},
            WEBHOOK_TASK: {"queue": MAINTENANCE_QUEUE},
            WEBHOOK_DISPATCH_TASK: {"queue": MAINTENANCE_QUEUE},
        },
        task_default_queue=MAINTENANCE_QUEUE,
        beat_schedule={
            # `expires`: a reap message that waited longer than one interval is dropped, not run late.
            "reap-stale-jobs": {
                "task": REAP_TASK,
                "schedule": settings.reap_interval_s,
                "options": {"expires": settings.reap_interval_s},
            },
            # Re-sends webhook deliveries that are overdue: their message was lost (broker down at
            # commit, Redis restart) or their worker died mid-attempt.
            "dispatch-webhooks": {
                "task": WEBHOOK_DISPATCH_TASK,
                "schedule": settings.webhook_dispatch_interval_s,
                "options": {"expires": settings.webhook_dispatch_interval_s},
            },
        },
        worker_hijack_root_logger=False,
        include=["worker.tasks"],
    )
    return app


@functools.cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def send_train(job_id: str) -> None:
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)


def send_generate(generation_id: str) -> None:
    get_celery().send_task(GENERATE_TASK, args=[generation_id], queue=GENERATE_QUEUE)


def send_webhook(delivery_id: str, countdown: float | None = None) -> None:
    get_celery().send_task(WEBHOOK_TASK, args=[delivery_id], queue=MAINTENANCE_QUEUE, countdown=countdown)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must open its own database connections, not share the parent's sockets.
    forget_engines()


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: object) -> None:
    # A receiver here keeps Celery from installing its own handlers: workers and beat log structured
    # lines like the API (ATELIER_LOG_FORMAT, json by default), at the --loglevel they were given.
    configure_logging(default_format="json", level=loglevel)


class _CeleryDispatcher:
    """core's doorbells (core/dispatch.py) rung through this module's senders, looked up at call time."""

    def send_train(self, job_id: str) -> None:
        send_train(job_id)

    def send_generate(self, generation_id: str) -> None:
        send_generate(generation_id)

    def send_webhook(self, delivery_id: str, countdown: float | None = None) -> None:
        send_webhook(delivery_id, countdown)


dispatch.install(_CeleryDispatcher())
