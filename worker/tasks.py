"""Thin Celery tasks: ids in, core does the work. Delivery semantics are declared here.

acks_late + reject_on_worker_lost re-deliver a message whose worker died; the job row's claim
makes any duplicate delivery a no-op, and the reaper turns a dead worker into a delay.
"""

from __future__ import annotations

import logging
import os
import socket

from celery import shared_task

from core import deletion
from core.config import Settings, get_settings
from core.db import session_scope
from core.generation import queue as generation_queue
from core.generation import states as generation_states
from core.jobs import states as jobs
from core.logs import log_context
from core.storage.factory import make_storage
from core.webhooks import delivery as webhook_delivery
from worker.app import (
    GENERATE_TASK,
    REAP_TASK,
    TRAIN_TASK,
    WEBHOOK_DISPATCH_TASK,
    WEBHOOK_TASK,
    send_generate,
    send_train,
    send_webhook,
)

log = logging.getLogger(__name__)


def worker_id(pid: int | None = None) -> str:
    """How a job row names the process running it (this one by default)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


@shared_task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train_job(job_id: str) -> str | None:
    from core.jobs.runner import run_training_job

    settings = get_settings()
    return run_training_job(
        job_id=job_id, settings=settings, storage=make_storage(settings), worker_id=worker_id()
    )


@shared_task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True)
def generate(generation_id: str) -> str | None:
    from core.generation.inference import run_generation

    settings = get_settings()
    # Every record logged while generating carries the generation's id (as training's carry job_id).
    with log_context(generation_id=generation_id):
        return run_generation(
            generation_id=generation_id,
            settings=settings,
            storage=make_storage(settings),
            worker_id=worker_id(),
        )


@shared_task(name=REAP_TASK, acks_late=True)
def reap_stale_jobs() -> dict[str, list[str]]:
    """Re-queue jobs and generations whose worker died and re-send queued ones whose message was
    lost; clean up dataset uploads whose API process died mid-upload."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        requeued = jobs.reap_stale(session=session)
        lost = jobs.undispatched(session=session, older_than_s=settings.queued_redispatch_s)
    with session_scope(settings.database_url) as session:
        interrupted = deletion.reap_interrupted_uploads(session=session, settings=settings)
    if interrupted:
        log.info("reaper: cleaned up interrupted dataset uploads %s", interrupted)
    resent = []
    for job_id in dict.fromkeys(requeued + lost):
        try:
            send_train(job_id)
        except Exception:
            log.exception("could not re-send job %s", job_id)
            continue
        with session_scope(settings.database_url) as session:
            jobs.mark_dispatched(session=session, job_id=job_id)
        resent.append(job_id)
    if requeued or resent:
        log.info("reaper: requeued %s, re-sent %s", requeued, resent)
    with session_scope(settings.database_url) as session:
        requeued_generations = generation_states.reap_stale(session=session)
    if requeued_generations:
        log.info("reaper: requeued generations %s", requeued_generations)
    generations = _resend_generations(settings, requeued_generations)
    return {
        "requeued": requeued,
        "resent": resent,
        "requeued_generations": requeued_generations,
        "resent_generations": generations,
    }


def _resend_generations(settings: Settings, requeued: list[str]) -> list[str]:
    """Generations just re-queued, and queued ones whose message may be lost, get another; a
    duplicate finds the row no longer queued and does nothing."""
    with session_scope(settings.database_url) as session:
        lost = generation_queue.undispatched(session=session, older_than_s=settings.queued_redispatch_s)
    resent = []
    for generation_id in dict.fromkeys(requeued + lost):
        try:
            send_generate(generation_id)
        except Exception:
            log.exception("could not re-send generation %s", generation_id)
            break  # the broker is down: the next beat tries again
        with session_scope(settings.database_url) as session:
            generation_queue.mark_dispatched(session=session, generation_id=generation_id)
        resent.append(generation_id)
    if resent:
        log.info("reaper: re-sent generations %s", resent)
    return resent


@shared_task(name=WEBHOOK_TASK, acks_late=True)
def deliver_webhook(delivery_id: str) -> str:
    """One attempt; a failed one schedules the next with a countdown. A lost countdown message
    (worker restart, broker restart) is covered by dispatch_webhooks, as is a worker killed mid-send."""
    outcome = webhook_delivery.deliver(delivery_id=delivery_id, settings=get_settings())
    if outcome.retry_in is not None:
        try:
            send_webhook(delivery_id, countdown=outcome.retry_in)
        except Exception:
            log.warning("could not schedule webhook %s again; the beat re-sends it when due", delivery_id)
    return outcome.status


@shared_task(name=WEBHOOK_DISPATCH_TASK, acks_late=True)
def dispatch_webhooks() -> dict[str, list[str]]:
    """Ring again for webhook deliveries that are overdue (the outbox's reconciler)."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        due = webhook_delivery.sweep(session=session, settings=settings)
    sent = []
    for delivery_id in due:
        try:
            send_webhook(delivery_id)
        except Exception:
            log.exception("could not re-send webhook delivery %s", delivery_id)
            break  # the broker is down: the next beat tries again
        sent.append(delivery_id)
    if due:
        log.info("webhooks: %d overdue, re-sent %d", len(due), len(sent))
    return {"due": due, "sent": sent}
