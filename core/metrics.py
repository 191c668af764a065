"""Prometheus collectors for `GET /metrics`, computed from the database and the broker at scrape time.

The API runs as several processes and the workers as others, so no process holds the truth in
memory: each scrape reads it where it lives (the job rows, the broker's queues). Any API process
answers a scrape with the same numbers.

Metrics (no labels beyond method, status, queue and device: no tenant, job or dataset ids, so the
endpoint can stay unauthenticated on the internal network):

- `atelier_database_up`, `atelier_broker_up`: 1 when the source answered this scrape. A source that
  is down leaves its other metrics out, but the scrape itself still answers.
- `atelier_jobs{method,status}`: training jobs, every (method, status) pair, zeros included.
- `atelier_training_images_per_second{method}` and `atelier_training_steps_per_second{method}`: the
  running jobs' latest reported rates (as of their last heartbeat), summed per method.
- `atelier_job_duration_seconds{method,status}`: histogram of finished jobs' run time, from the
  last claim to the end (a retried job: its final attempt). `atelier_job_turnaround_seconds`: from
  creation to the end, queueing and retries included. Both count every finished job in the
  database, so they only grow, like any Prometheus histogram: `rate(..._bucket[1h])` gives the
  recent distribution and `histogram_quantile` works on it. (A sliding-window histogram would
  shrink between scrapes and look like counter resets to `rate()`.)
- `atelier_datasets{status}`, `atelier_artifacts{method}`, `atelier_generations{status}`.
- `atelier_queue_messages{queue}`: messages waiting in each Celery queue (Redis: LLEN over the
  queue's priority lists; filesystem broker: message files). `atelier_broker_unacked_messages`
  (Redis): delivered but not yet acknowledged, i.e. tasks in progress (acks are late).

GPU memory lives in the worker processes (the API has no torch): see worker/metrics.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from core.db import new_session
from core.models import Artifact, Dataset, DatasetStatus, Generation, Job, JobStatus
from core.spec.catalogue import CATALOGUE

log = logging.getLogger(__name__)

# Training runs from a minute to a day; generations are not in these histograms.
DURATION_BUCKETS: tuple[float, ...] = (
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    7200,
    14400,
    28800,
    86400,
)
BROKER_TIMEOUT_S = 2.0  # a scrape must answer well within Prometheus's default 10 s timeout


def _gauge(name: str, doc: str, labels: Sequence[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    """end - start in seconds, in SQL: the two databases spell date arithmetic differently."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _job_counts(session: Session) -> Metric:
    counts: dict[tuple[str, ...], float] = {(m, str(s)): 0 for m in CATALOGUE for s in JobStatus}
    rows = session.execute(select(Job.method, Job.status, func.count()).group_by(Job.method, Job.status))
    for method, status, count in rows:
        counts[(method, status)] = count
    return _gauge("atelier_jobs", "Training jobs by method and status", ("method", "status"), counts)


def _training_rates(session: Session) -> Iterator[Metric]:
    images: dict[tuple[str, ...], float] = {(m,): 0.0 for m in CATALOGUE}
    steps = dict(images)
    rows = session.execute(
        select(Job.method, Job.images_per_s, Job.spec).where(
            Job.status == JobStatus.running, Job.images_per_s.is_not(None)
        )
    )
    for method, images_per_s, spec in rows:
        training = (spec or {}).get("training", {})
        per_step = training.get("batch_size", 1) * training.get("gradient_accumulation_steps", 1)
        images[(method,)] = images.get((method,), 0.0) + images_per_s
        steps[(method,)] = steps.get((method,), 0.0) + images_per_s / max(per_step, 1)
    doc = "running jobs' latest reported training rate, summed per method"
    yield _gauge("atelier_training_images_per_second", f"Images/s: {doc}", ("method",), images)
    yield _gauge("atelier_training_steps_per_second", f"Optimizer steps/s: {doc}", ("method",), steps)


def _duration_histogram(
    session: Session, name: str, doc: str, start: Any, where: Iterable[ColumnElement[bool]]
) -> Metric:
    seconds = _seconds_between(session, start, Job.finished_at)
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    query = (
        select(Job.method, Job.status, func.count(), func.sum(seconds), *buckets)
        .where(Job.status.in_([s for s in JobStatus if s.is_terminal]), Job.finished_at.is_not(None), *where)
        .group_by(Job.method, Job.status)
    )
    family = HistogramMetricFamily(name, doc, labels=["method", "status"])
    for method, status, count, total, *cumulative in session.execute(query):
        pairs = [
            (floatToGoString(b), float(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)
        ]
        family.add_metric([method, status], [*pairs, ("+Inf", float(count))], float(total or 0.0))
    return family


def _durations(session: Session) -> Iterator[Metric]:
    yield _duration_histogram(
        session,
        "atelier_job_duration_seconds",
        "Finished training jobs' run time, last claim to end (all finished jobs in the database)",
        Job.started_at,
        [Job.started_at.is_not(None)],
    )
    yield _duration_histogram(
        session,
        "atelier_job_turnaround_seconds",
        "Finished training jobs' creation to end, queueing and retries included",
        Job.created_at,
        [],
    )


def _grouped(session: Session, column: Any, keys: Iterable[str]) -> dict[tuple[str, ...], float]:
    counts: dict[tuple[str, ...], float] = {(k,): 0 for k in keys}
    for value, count in session.execute(select(column, func.count()).group_by(column)):
        counts[(value,)] = count
    return counts


def database_metrics(session: Session) -> Iterator[Metric]:
    yield _job_counts(session)
    yield from _training_rates(session)
    yield from _durations(session)
    yield _gauge(
        "atelier_datasets",
        "Datasets by status",
        ("status",),
        _grouped(session, Dataset.status, [str(s) for s in DatasetStatus]),
    )
    yield _gauge(
        "atelier_artifacts",
        "Trained artifacts by method",
        ("method",),
        _grouped(session, Artifact.method, CATALOGUE),
    )
    yield _gauge(
        "atelier_generations",
        "Generation requests by status",
        ("status",),
        _grouped(session, Generation.status, [str(s) for s in JobStatus]),
    )


# --- the broker -----------------------------------------------------------------------------------


def _redis_depths(url: str, queues: Sequence[str]) -> tuple[dict[str, int], int]:
    import redis
    from kombu.transport.redis import Channel

    # kombu keeps one list per priority step: "train", then "train\x06\x163", ... (Channel._q_for_pri).
    def keys(queue: str) -> list[str]:
        return [f"{queue}{Channel.sep}{step}" if step else queue for step in Channel.priority_steps]

    client = redis.Redis.from_url(
        url, socket_connect_timeout=BROKER_TIMEOUT_S, socket_timeout=BROKER_TIMEOUT_S
    )
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for key in keys(queue):
                pipe.llen(key)
        pipe.hlen(Channel.unacked_key)
        replies = pipe.execute()
    finally:
        client.close()
    per_queue = len(Channel.priority_steps)
    depths = {q: sum(replies[i * per_queue : (i + 1) * per_queue]) for i, q in enumerate(queues)}
    return depths, int(replies[-1])


def _folder_depths(folder: Path, queues: Sequence[str]) -> dict[str, int]:
    # kombu's filesystem transport names a message "<ms>_<uuid>.<queue>.msg" and matches it the same way.
    depths = dict.fromkeys(queues, 0)
    if not folder.is_dir():
        return depths  # nothing was ever sent
    for path in folder.iterdir():
        queue = path.name.partition(".")[2].removesuffix(".msg")
        if queue in depths and path.name.endswith(".msg"):
            depths[queue] += 1
    return depths


def broker_metrics(*, broker_url: str, broker_folder: Path, queues: Sequence[str]) -> Iterator[Metric]:
    scheme = urlsplit(broker_url).scheme
    if scheme not in ("redis", "rediss", "filesystem"):
        return  # e.g. memory:// in tests: there is no queue to look into from another process
    unacked = None
    try:
        if scheme == "filesystem":
            depths = _folder_depths(broker_folder / "queue", queues)
        else:
            depths, unacked = _redis_depths(broker_url, queues)
    except Exception as exc:  # any failure: report the broker down, keep the rest of the scrape
        log.warning("metrics: broker unreachable: %s: %s", type(exc).__name__, exc)
        yield GaugeMetricFamily("atelier_broker_up", "1 when the broker answered this scrape", value=0)
        return
    yield GaugeMetricFamily("atelier_broker_up", "1 when the broker answered this scrape", value=1)
    yield _gauge(
        "atelier_queue_messages",
        "Messages waiting in each Celery queue",
        ("queue",),
        {(q,): n for q, n in depths.items()},
    )
    if unacked is not None:
        yield GaugeMetricFamily(
            "atelier_broker_unacked_messages",
            "Messages delivered to workers and not yet acknowledged (tasks in progress)",
            value=unacked,
        )


class AtelierCollector:
    """Everything `/metrics` serves, read fresh from the database and the broker on each scrape."""

    def __init__(self, *, database_url: str, broker_url: str, broker_folder: Path, queues: Sequence[str]):
        self.database_url, self.broker_url = database_url, broker_url
        self.broker_folder, self.queues = broker_folder, tuple(queues)

    def collect(self) -> Iterator[Metric]:
        try:
            session = new_session(self.database_url)
            try:
                # Read in full first: a failure halfway must not leave half the families emitted.
                families = list(database_metrics(session))
            finally:
                session.close()
            up = 1
        except Exception as exc:
            log.warning("metrics: database unreachable: %s: %s", type(exc).__name__, exc)
            families, up = [], 0
        yield GaugeMetricFamily("atelier_database_up", "1 when the database answered this scrape", value=up)
        yield from families
        yield from broker_metrics(
            broker_url=self.broker_url, broker_folder=self.broker_folder, queues=self.queues
        )
