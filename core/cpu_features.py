"""What this host's CPU can do, read without torch (the API's planner asks too)."""

from __future__ import annotations

import functools
from pathlib import Path

# oneDNN runs bf16 natively from AVX-512 "core" (F, BW, VL, DQ) on, and with AMX; on ARM with the
# BF16 extension. This is the test torch's `torch.ops.mkldnn._is_mkldnn_bf16_supported()` makes.
_X86_BF16 = ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, {"amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this host's CPU runs bf16 matmuls and convolutions natively (oneDNN on AVX-512 or
    AMX). Elsewhere (AVX2 hosts) torch emulates them element by element: measured on an AVX2 EPYC,
    a 1024x1280x1280 bf16 matmul took 175 times as long as fp32 and a 3x3 convolution 245 times."""
    flags = cpu_flags()
    return any(needed <= flags for needed in _X86_BF16) or "bf16" in flags
