"""One optimizer step of the shared loop, run eagerly or through a captured (compiled) graph.

Why capture: an eager step of an SD-sized UNet dispatches thousands of small aten ops, each with
tens of microseconds of host work, so below batch 4 or so the GPU waits on Python. `torch.compile`
turns the method's forward + loss (UNet, adapters, text encoder when it trains) into one graph per
batch shape; AOTAutograd compiles its backward too; on CUDA the graphs are replayed as CUDA graphs
(`mode="reduce-overhead"`; not with gradient accumulation, see CompiledForward), so a step costs a
handful of launches. The optimizer stays the fused
AdamW kernel (one launch for all parameters, already captured-grade); clipping is a few foreach ops.

Every method's forward traces with zero graph breaks on the SD and SDXL UNets (tests/test_compiled_step.py
counts them with dynamo's own counters). Shapes are static: cached latents and aspect buckets give a
few fixed shapes (each bucket's full batch, and its short last batch), each compiled once.

`training.compile`:
- "off": eager, bit-identical on resume;
- "on": compiled from the first step;
- "auto": a few eager steps are timed first; the job compiles only when its remaining steps save
  more time than compiling is expected to cost (measured by earlier jobs in this worker, else a
  per-device default), so a short job never pays minutes of compile for seconds of training.

Compile time is reported on its own (`CompileStats.compile_s`) and the steps that compile are left
out of images/s. Compiled graphs persist in inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`,
which the worker points at its model cache), so a later job with the same shapes skips codegen.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from core.training.caching import Batch

log = logging.getLogger(__name__)

# Where "auto" may compile: CPU compiles are captured without code generation (see
# backend_and_mode), so they never repay anything there.
AUTO_DEVICES = ("cuda",)
# "auto" times this many eager steps (after one untimed warm-up step) before deciding.
AUTO_PROBE_STEPS = 3
# What compiling is expected to save per step, as a speed-up over eager. Measured: tiny-sd LoRA on
# one CPU thread 1.6x (bench/compiled_step.py); the GPU figure is the H100 SD1.5 LoRA
# profile (host-bound eager ~160 ms, captured step GPU-bound). Until a device run replaces it, it is
# an estimate, and only decides "auto".
EXPECTED_SPEEDUP = {"cpu": 1.5, "cuda": 2.5}
# Expected seconds to compile one shape (forward + backward) when this worker has not compiled one
# yet: dynamo tracing plus inductor codegen with a cold cache (tiny bases on 2 CPU cores: 40-200 s).
DEFAULT_COMPILE_S = {"cpu": 120.0, "cuda": 90.0}
# Compile seconds measured by earlier jobs in this process, per (method, architecture, device type).
_measured_compile_s: dict[tuple[str, str, str], float] = {}


@dataclass
class CompileStats:
    """What the job reports about compiling (manifest metrics `compile`)."""

    setting: str  # the job's training.compile
    enabled: bool = False
    reason: str = ""
    backend: str | None = None
    mode: str | None = None
    compiled_at_step: int | None = None  # 1-based step whose micro-batches first ran compiled
    compile_s: float = 0.0  # wall time of the steps that compiled, all shapes
    shapes: int = 0  # distinct batch shapes compiled (one graph set each)
    graphs: int = 0  # graphs dynamo produced (1 per shape when nothing breaks)
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    eager_step_s: float | None = None  # what "auto" measured before deciding

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backend_and_mode(device: torch.device, *, cuda_graphs: bool = True) -> tuple[str, str | None]:
    """The torch.compile backend and mode for `device`.

    `ATELIER_COMPILE_BACKEND` overrides the backend: "aot_eager" traces and runs AOTAutograd's
    graphs without code generation (the tests' choice: same graph breaks, seconds not minutes).

    On the CPU the default is "aot_eager", not inductor: torch 2.13's inductor CPU code for the
    tiny-sd LoRA backward returns gradients up to 180 % off eager's (eager agrees with the math SDPA
    reference to 2e-6, and AOTAutograd's own decomposed graphs to 2e-6, so the fault is in inductor's
    CPU code generation; bench/compiled_grads.py reproduces it). Training must not silently learn
    something else, so inductor on the CPU is opt-in (ATELIER_COMPILE_BACKEND=inductor), for
    benchmarks only.
    """
    default = "inductor" if device.type == "cuda" else "aot_eager"
    backend = os.environ.get("ATELIER_COMPILE_BACKEND", default)
    if backend == "inductor" and device.type == "cuda" and cuda_graphs:
        return backend, "reduce-overhead"  # CUDA graphs: one replay instead of thousands of launches
    return backend, None


def _counter_snapshot() -> tuple[int, int, dict[str, int]]:
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return int(counters["stats"]["unique_graphs"]), sum(breaks.values()), breaks


def batch_shape(batch: Batch) -> tuple[Any, ...]:
    """The shapes a compiled graph specialises on: latents, and a prior half when there is one."""
    prior = batch.prior
    return (tuple(batch.latents.shape), tuple(prior.latents.shape) if prior is not None else None)


class CompiledForward:
    """`loss_fn(batch)` compiled once per batch shape; counts graphs, breaks and compile time."""

    def __init__(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        device: torch.device,
        stats: CompileStats,
        *,
        accumulation: int = 1,
    ):
        import torch._dynamo

        self.device = device
        self.stats = stats
        # CUDA graphs replay into static output buffers. The parameters' gradients can be those
        # buffers (autograd adopts a fresh gradient instead of copying it), so a second micro-batch
        # replaying the backward before the optimizer step would overwrite the first one's
        # gradients: with accumulation the graphs are compiled, not captured.
        backend, mode = backend_and_mode(device, cuda_graphs=accumulation == 1)
        stats.backend, stats.mode = backend, mode
        # Each bucket shape is its own graph; dynamo's default limit (8) would silently fall back
        # to eager past the eighth.
        config = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit_name, max(getattr(config, limit_name), 64))
        self._compiled = torch.compile(loss_fn, backend=backend, mode=mode, dynamic=False)
        self._seen: set[tuple[Any, ...]] = set()

    def is_new(self, batch: Batch) -> bool:
        return batch_shape(batch) not in self._seen

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.device.type == "cuda" and self.stats.mode == "reduce-overhead":
            # A new iteration for CUDA graph trees: earlier outputs may be overwritten from here.
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(batch)

    def compiling_call(self, batch: Batch, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Forward and backward of a shape not seen before: timed, and its graphs counted."""
        graphs0, breaks0, reasons0 = _counter_snapshot()
        start = time.perf_counter()
        loss = self(batch)
        backward(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.compile_s += time.perf_counter() - start
        graphs1, breaks1, reasons1 = _counter_snapshot()
        self._seen.add(batch_shape(batch))
        self.stats.shapes = len(self._seen)
        self.stats.graphs += graphs1 - graphs0
        self.stats.graph_breaks += breaks1 - breaks0
        for reason, count in reasons1.items():
            if count > reasons0.get(reason, 0) and len(self.stats.break_reasons) < 10:
                self.stats.break_reasons.append(reason.split("\n")[0][:300])
        return loss


def forget_compiled() -> None:
    """Drop dynamo's in-memory caches (guards, graphs holding the job's modules)."""
    import torch._dynamo

    torch._dynamo.reset()


def compile_cost_key(method: str, architecture: str, device: torch.device) -> tuple[str, str, str]:
    return (method, architecture, device.type)


def record_compile_cost(key: tuple[str, str, str], stats: CompileStats) -> None:
    if stats.shapes:
        _measured_compile_s[key] = stats.compile_s / stats.shapes


def expected_compile_s(key: tuple[str, str, str], shapes: int) -> float:
    per_shape = _measured_compile_s.get(key, DEFAULT_COMPILE_S.get(key[2], DEFAULT_COMPILE_S["cuda"]))
    return per_shape * max(shapes, 1)


def repays(*, eager_step_s: float, remaining_steps: int, compile_s: float, device: torch.device) -> bool:
    """Whether `remaining_steps` compiled steps save more than `compile_s` over eager ones."""
    speedup = EXPECTED_SPEEDUP.get(device.type, EXPECTED_SPEEDUP["cuda"])
    saving = remaining_steps * eager_step_s * (1.0 - 1.0 / speedup)
    return saving > compile_s
