"""Compiling the training step (training.compile): when to, how, and falling back to eager.

`choose_compile` turns "on"/"off" into a decision before the first step; "auto" (`AutoCompile`)
times a few eager steps and compiles only when the steps left repay it. Any compile failure leaves
the job training eagerly, never failed (core/training/step.py has the captured step itself).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.bases.allow_list import architecture_of_folder
from core.training.caching import Batch, PairedData, TrainingData
from core.training.run import Run, forward
from core.training.step import (
    AUTO_PROBE_STEPS,
    CompiledForward,
    compile_cost_key,
    expected_compile_s,
    forget_compiled,
    record_compile_cost,
    repays,
)

log = logging.getLogger(__name__)


def choose_compile(run: Run, start: int) -> None:
    stats, setting = run.compile_stats, run.training.compile
    if run.device.type not in ("cpu", "cuda"):
        stats.setting, stats.reason = "off", f"compiling is not supported on {run.device.type}"
    elif setting == "on":
        enable_compile(run, start + 1, "training.compile is on")
    elif setting == "off":
        stats.reason = "training.compile is off"


def compiling_call(
    run: Run, compiled: CompiledForward, batch: Batch, backward: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """Forward and backward of a batch shape not compiled yet. Compiling happens before any
    gradient is written, so when it fails the micro-batch runs eagerly and the job goes on eager."""
    try:
        return compiled.compiling_call(batch, backward)
    except Exception as exc:  # any backend failure: no C compiler, an unsupported op
        compile_failed(run, exc)
        loss = forward(run, batch)
        backward(loss)
        return loss


def batch_shapes(data: TrainingData | PairedData) -> int:
    """How many distinct micro-batch shapes the run will see: per bucket, the full batch and a
    short last one when the bucket does not divide (each is one compiled graph set)."""
    sampler = (data.instance if isinstance(data, PairedData) else data).sampler
    size = sampler.batch_size
    return sum((n >= size) + (n % size != 0) for n in sampler.bucket_lengths)


def architecture(run: Run) -> str:
    """A key for "same compile cost": the base's architecture signature, else its id."""
    signature = architecture_of_folder(Path(run.trainable.base.path))
    return json.dumps(signature, sort_keys=True) if signature else run.spec.base_model


def enable_compile(run: Run, step: int, reason: str) -> None:
    """Compile from 1-based step `step` on: the method's forward + loss, per batch shape."""
    stats = run.compile_stats
    stats.enabled, stats.reason, stats.compiled_at_step = True, reason, step

    def loss_fn(batch: Batch) -> torch.Tensor:
        return forward(run, batch)

    prime(run, step)
    try:
        run.compiled = CompiledForward(
            loss_fn, run.device, stats, accumulation=run.training.gradient_accumulation_steps
        )
    except Exception as exc:  # an unknown backend, a torch build without dynamo: stay eager
        compile_failed(run, exc)
        return
    log.info("compiling the training step from step %d: %s", step, reason)


def prime(run: Run, step: int) -> None:
    """One eager forward before compiling, for models that set themselves up lazily on their first
    call: transformers 5 installs its hidden-state capture hooks (behind a lock) the first time a
    text encoder is asked for hidden states, which would break the graph of SDXL textual inversion.
    Without gradients and in eval mode (no dropout draws); the batch is a pure function of its
    index, so the run's random streams are untouched."""
    batch = run.data.micro_batch((step - 1) * run.training.gradient_accumulation_steps)
    run.trainable.eval()
    try:
        with torch.no_grad():
            forward(run, batch)
    finally:
        run.trainable.train()


def compile_failed(run: Run, exc: Exception) -> None:
    log.warning("compiling the training step failed; training eagerly: %s", exc)
    stats = run.compile_stats
    stats.enabled, stats.reason = False, f"compile failed: {type(exc).__name__}: {exc}"[:500]
    run.compiled = None


class AutoCompile:
    """training.compile = "auto": time a few eager steps, then compile only if the steps left save
    more than compiling is expected to cost."""

    def __init__(self, run: Run, start: int) -> None:
        self.run = run
        self.warmup = start + 1  # the first step pays one-off costs (allocator, lazy init): untimed
        self.began = 0.0

    def _now(self) -> float:
        if self.run.device.type == "cuda":
            torch.cuda.synchronize(self.run.device)
        return time.perf_counter()

    def after_step(self, done: int) -> bool:
        """Called after each step; True once decided."""
        run, stats = self.run, self.run.compile_stats
        remaining = run.training.max_steps - done
        if done == self.warmup:
            if remaining <= AUTO_PROBE_STEPS:
                stats.reason = "auto: too few steps to repay compiling"
                return True
            self.began = self._now()
            return False
        if done < self.warmup + AUTO_PROBE_STEPS:
            return False
        eager = (self._now() - self.began) / AUTO_PROBE_STEPS
        stats.eager_step_s = round(eager, 6)
        key = compile_cost_key(run.spec.params.method, architecture(run), run.device)
        cost = expected_compile_s(key, batch_shapes(run.data))
        verdict = f"{remaining} steps at {eager * 1000:.1f} ms eager against ~{cost:.0f} s of compiling"
        if repays(eager_step_s=eager, remaining_steps=remaining, compile_s=cost, device=run.device):
            enable_compile(run, done + 1, f"auto: {verdict} repays it")
        else:
            stats.reason = f"auto: {verdict} does not repay it"
        return True


def finish_compiling(run: Run) -> None:
    """After the loop, however it ended: remember what compiling cost, and drop dynamo's caches."""
    if run.compiled is None:
        return
    key = compile_cost_key(run.spec.params.method, architecture(run), run.device)
    record_compile_cost(key, run.compile_stats)
    # Dynamo's caches hold this job's modules (the whole base) and count against its
    # per-function recompile limit: a long-lived worker must start each job clean. The
    # compiled code itself stays in inductor's on-disk cache for the next job.
    run.compiled = None
    forget_compiled()
