"""Fit before queueing: a job's memory plan against the training workers (design.md §7).

The API plans every job whose base architecture it knows (core.bases.allow_list.architecture_for) with
the torch-free planner (core/training/memory.py) against the largest training worker: the live
announcements of CUDA workers (core/jobs/workers.py) together with the configured worker classes
(Settings.train_worker_memory_gib), since a configured class may be scaled to zero right now and its
jobs should wait, not be refused. CPU workers have no accelerator limit and are not counted; with
nothing announced and nothing configured (the embedded default) nothing is checked.

Jobs are not routed by memory: a job that fits only the largest class can be taken by a smaller
worker on the same queue. Deployments with several classes should give each its own queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from core.bases.allow_list import architecture_for
from core.bases.architectures import Architecture
from core.config import Settings
from core.jobs.workers import live_workers
from core.spec.job import JobSpec
from core.training.memory import (
    GIB,
    RESERVE_BYTES,
    Change,
    FitPlan,
    MemoryEstimate,
    estimate,
    plan_fit,
)

DEVICE = "cuda"  # the planner's device: training workers that announce a limit are CUDA workers
BASE_OPTIMIZERS = frozenset({"adamw", "adafactor"})  # every worker has these


@dataclass(frozen=True)
class Capacity:
    """The largest training worker: its memory, and whether 8-bit optimizers run there."""

    memory_bytes: int
    bitsandbytes: bool

    @property
    def optimizers(self) -> frozenset[str]:
        # 8-bit AdamW only where every worker of this size has bitsandbytes; the planner falls
        # back to Adafactor's factored state (smaller still) where 8-bit is not enough.
        return BASE_OPTIMIZERS | {"adamw_8bit"} if self.bitsandbytes else BASE_OPTIMIZERS


def training_capacity(*, session: Session, settings: Settings) -> Capacity | None:
    """The largest training worker, announced or configured; None when none is known."""
    classes = [
        (w.memory_bytes, w.bitsandbytes)
        for w in live_workers(session=session, live_s=settings.worker_live_s)
        if w.device == "cuda"
    ]
    # Configured classes are not known to have bitsandbytes; Adafactor needs nothing extra.
    classes += [(int(gib * GIB), False) for gib in settings.train_worker_memory_gib]
    if not classes:
        return None
    largest = max(memory for memory, _ in classes)
    # A job may land on any worker of that size: 8-bit only if all of them can run it.
    return Capacity(largest, all(bnb for memory, bnb in classes if memory == largest))


@dataclass(frozen=True)
class JobFit:
    spec: JobSpec  # what the job trains: as sent, or with `memory["changes"]` applied
    memory: dict[str, Any] | None  # the job's memory resource; None where the architecture is unknown
    fits: bool | None  # None: no worker memory is known, nothing was checked
    suggested_changes: list[dict[str, Any]]  # when it does not fit: what fit "auto" would change
    detail: str | None  # when it does not fit: why, and what would make it fit


def plan_job(*, spec: JobSpec, settings: Settings, session: Session) -> JobFit:
    arch = architecture_for(spec.base_model, settings)
    if arch is None:
        return JobFit(spec, None, None, [], None)
    capacity = training_capacity(session=session, settings=settings)
    if capacity is None:
        memory = _memory(spec, arch, estimate(spec, arch, device=DEVICE), None, None, [])
        return JobFit(spec, memory, None, [], None)
    plan = _plan(spec, arch, capacity, auto=spec.training.fit == "auto")
    if plan.fits:
        memory = _memory(spec, arch, plan.estimate, capacity, True, plan.changes)
        return JobFit(plan.spec, memory, True, [], None)
    as_sent = estimate(spec, arch, device=DEVICE)
    auto = plan if plan.changes else _plan(spec, arch, capacity, auto=True)
    suggested = [c.to_public() for c in auto.changes] if auto.fits else []
    memory = _memory(spec, arch, as_sent, capacity, False, [])
    return JobFit(spec, memory, False, suggested, _refusal(spec, arch, as_sent.peak_bytes, capacity, auto))


def _plan(spec: JobSpec, arch: Architecture, capacity: Capacity, *, auto: bool) -> FitPlan:
    return plan_fit(
        spec, arch, capacity.memory_bytes, auto=auto, optimizers=capacity.optimizers, device=DEVICE
    )


def _memory(
    spec: JobSpec,
    arch: Architecture,
    peak: MemoryEstimate,
    capacity: Capacity | None,
    fits: bool | None,
    changes: list[Change],
) -> dict[str, Any]:
    """The job's `memory` resource: `estimate` is of the job as it trains (after `changes`)."""
    return {
        "architecture": arch.name,
        "device": DEVICE,
        "fit": spec.training.fit,
        "fits": fits,
        "capacity_bytes": capacity.memory_bytes if capacity else None,
        "reserve_bytes": RESERVE_BYTES,
        "estimate": peak.to_public(),
        "changes": [c.to_public() for c in changes],
    }


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _settings_text(changes: list[Change]) -> str:
    return ", ".join(f"{c.field}={json.dumps(c.after)}" for c in changes)


def _refusal(spec: JobSpec, arch: Architecture, peak: int, capacity: Capacity, auto: FitPlan) -> str:
    training = spec.training
    resolution = training.resolution or arch.resolution
    head = (
        f"This {spec.params.method} job on {spec.base_model} ({resolution} px, batch "
        f"{training.batch_size}) needs about {_gib(peak + RESERVE_BYTES)} (an estimated "
        f"{_gib(peak)} peak + {_gib(RESERVE_BYTES)} reserve); the largest training worker has "
        f"{_gib(capacity.memory_bytes)}"
    )
    if auto.fits:
        return (
            f'{head}. With training.fit "auto" Atelier would set {_settings_text(auto.changes)} '
            f"(about {_gib(auto.estimate.peak_bytes)}), or set them yourself."
        )
    tried = f"even with {_settings_text(auto.changes)} it" if auto.changes else "it"
    return (
        f"{head}; {tried} would need about {_gib(auto.estimate.peak_bytes + RESERVE_BYTES)}: lower "
        "training.resolution, train fewer weights (e.g. LoRA instead of DreamBooth), or add a "
        "training worker with more memory."
    )
