"""Which device and dtype a worker process computes on."""

from __future__ import annotations

import torch

from core.config import Settings


def pick_device(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 frozen weights where present (trainable params stay fp32), else CPU fp32."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    wants_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        bf16 = torch.cuda.is_bf16_supported()
        return torch.device("cuda"), torch.bfloat16 if bf16 else torch.float16
    return torch.device("cpu"), torch.float32
