"""GPU memory for Prometheus, served by a worker on `atelier worker --metrics-port` (ATELIER_METRICS_PORT).

The API has no torch, so GPU memory is scraped from the workers themselves. Jobs run in Celery's pool
children (a fresh one per training job), where CUDA lives; the HTTP server runs in the worker's main
process, which must never touch CUDA (a CUDA context does not survive the fork of the next child).
prometheus_client's multiprocess mode joins the two: each child writes its gauges to files in a
folder of this worker's own (PROMETHEUS_MULTIPROC_DIR), the server reads them at scrape time, and a
child that exited (or was killed) is forgotten.

Metrics, labelled `device` (the CUDA device index as the worker sees it):
- `atelier_gpu_memory_allocated_bytes`: memory in PyTorch tensors, summed over the worker's processes.
- `atelier_gpu_memory_reserved_bytes`: memory held by PyTorch's caching allocator, summed likewise.
- `atelier_gpu_memory_peak_bytes`: the largest peak allocation of a live process (with one job per
  process, the running job's peak so far).
- `atelier_gpu_memory_free_bytes`, `atelier_gpu_memory_total_bytes`: the device as CUDA reports it,
  every process on it included.
A process is sampled every few seconds once it uses CUDA; before that, or on a CPU worker, the GPU
series are absent rather than zero.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_ENV = "ATELIER_METRICS_PORT"
SAMPLE_INTERVAL_S = 5.0


class GpuGauges:
    def __init__(self) -> None:
        from prometheus_client import Gauge

        def gauge(name: str, doc: str, mode: str) -> Any:
            return Gauge(name, doc, ["device"], multiprocess_mode=mode)

        self.allocated = gauge("atelier_gpu_memory_allocated_bytes", "GPU memory in tensors", "livesum")
        self.reserved = gauge("atelier_gpu_memory_reserved_bytes", "GPU memory held by PyTorch", "livesum")
        self.peak = gauge("atelier_gpu_memory_peak_bytes", "Peak tensor memory of a process", "livemax")
        self.free = gauge("atelier_gpu_memory_free_bytes", "Free memory on the device", "livemin")
        self.total = gauge("atelier_gpu_memory_total_bytes", "Memory of the device", "livemax")


@functools.cache
def gpu_gauges() -> GpuGauges:
    return GpuGauges()


def sample_gpu_memory() -> bool:
    """Record this process's GPU memory; False (and nothing recorded) when it does not use CUDA."""
    # Never imports torch nor starts CUDA for a metric: that would cost a context's memory, and
    # in the worker's main process break the children it forks.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    gauges, label = gpu_gauges(), str(device)
    gauges.allocated.labels(label).set(torch.cuda.memory_allocated(device))
    gauges.reserved.labels(label).set(torch.cuda.memory_reserved(device))
    gauges.peak.labels(label).set(torch.cuda.max_memory_allocated(device))
    gauges.free.labels(label).set(free)
    gauges.total.labels(label).set(total)
    return True


def _sample_forever() -> None:
    while True:
        try:
            sample_gpu_memory()
        except Exception:  # a metric must never take the job down
            log.debug("GPU memory sample failed", exc_info=True)
        time.sleep(SAMPLE_INTERVAL_S)


def _start_sampler(**_: object) -> None:
    threading.Thread(target=_sample_forever, name="gpu-metrics", daemon=True).start()


def _forget_process(**_: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveProcessCollector:
    """The children's values, after dropping those of children that died without saying so (SIGKILL,
    OOM killer): their files would otherwise report a dead job's memory for ever."""

    def __init__(self, folder: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.folder = folder
        self.inner = MultiProcessCollector(None, path=folder)

    def collect(self) -> Any:
        from prometheus_client import multiprocess

        for path in Path(self.folder).glob("gauge_live*_*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), self.folder)
        return self.inner.collect()


def serve_worker_metrics(*, port: int, host: str = "0.0.0.0") -> str:
    """Serve /metrics on `port` from this (main) process and sample GPU memory in every pool child.

    Must run before anything imports prometheus_client: its value storage is chosen at import.
    Returns the folder the children write to.
    """
    if "prometheus_client" in sys.modules and MULTIPROC_ENV not in os.environ:
        raise RuntimeError("serve_worker_metrics() must run before prometheus_client is imported")
    folder = tempfile.mkdtemp(prefix="atelier-metrics-")
    os.environ[MULTIPROC_ENV] = folder  # inherited by the forked children
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(LiveProcessCollector(folder))
    start_http_server(port, addr=host, registry=registry)
    owner = os.getpid()
    # weak=False: the receivers must outlive this call; they run in each child after the fork.
    worker_process_init.connect(_start_sampler, weak=False)
    worker_process_shutdown.connect(_forget_process, weak=False)
    import atexit

    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    log.info("worker metrics on http://%s:%s/metrics", host, port)
    return folder
