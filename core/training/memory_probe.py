"""Measure the peak memory of tensors, on CUDA and on the CPU alike.

On CUDA the caching allocator counts (`torch.cuda.max_memory_allocated`). The CPU allocator keeps no
such count, so on the CPU a dispatch mode watches every op: each output that owns a storage no input
shares is a new allocation, and a finalizer on that storage subtracts it when it is freed. What it
sees is exactly the tensors an op returns (activations, saved tensors, gradients, optimizer state,
autocast copies), which is what `max_memory_allocated` counts on a GPU, less the scratch space
inside fused kernels that a GPU allocator also sees. Storages alive before the probe started are
either given to it to `watch` (the weights the caller loaded: counted, and subtracted when freed)
or a fixed `baseline` of bytes. Tensors a loader creates outside the dispatcher (safetensors reads
in `from_pretrained`) are not seen on the CPU; the caller adds those.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied and viewed weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `modules`."""
    tensors: list[torch.Tensor] = []
    for module in modules:
        if module is not None:
            tensors += [*module.parameters(), *module.buffers()]
    return storage_bytes(tensors)


class _CpuTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def watch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages that exist already (loaded weights) as live, and subtract them when they
        are freed: casting a loaded fp32 model to bf16 then shows as the drop it is."""
        for tensor in tensors:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._freed, nbytes)
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            arg.untyped_storage().data_ptr()
            for arg in tree_flatten((args, kwargs))[0]
            if isinstance(arg, torch.Tensor) and arg.device.type != "meta"
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            # Views, in-place results and out= arguments share an input's storage: not new memory.
            if storage.data_ptr() in inputs or storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, nbytes)
        return out


class PeakMemory:
    """`with PeakMemory(device, baseline=...) as probe: ...` then `probe.peak` (bytes): the most
    tensor memory live at once inside the block. On the CPU the `watch`ed tensors and `baseline`
    bytes count as live from the start; on CUDA the allocator's own absolute count is used."""

    def __init__(
        self, device: torch.device, *, baseline: int = 0, watch: Iterable[torch.Tensor] = ()
    ) -> None:
        self.device = device
        self.baseline = baseline
        self._watch = list(watch)
        self._tracker: _CpuTracker | None = None
        self.peak = 0  # since the last reset_peak
        self.overall = 0  # across resets: the whole block

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = _CpuTracker()
            self._tracker.watch(self._watch)
            self._tracker.__enter__()
        self._watch = []
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Absolute on CUDA: the allocator itself counts what was live before (`baseline` too).
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            assert self._tracker is not None
            self._tracker.__exit__(*exc)
            self.peak = self._tracker.peak + self.baseline
        self.overall = max(self.overall, self.peak)

    def current_peak(self) -> int:
        """The peak so far, as `peak` will report it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return (self._tracker.peak if self._tracker else 0) + self.baseline

    def reset_peak(self) -> None:
        """Start `peak` afresh (e.g. after setup, to see one training step alone); `overall` keeps it."""
        self.overall = max(self.overall, self.current_peak())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._tracker is not None:
            self._tracker.peak = self._tracker.live

    @property
    def live(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (self._tracker.live if self._tracker else 0) + self.baseline
