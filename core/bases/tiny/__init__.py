"""The built-in tiny bases: real diffusers classes at tiny widths, pre-trained briefly on a synthetic
world (world.py) so that prompts steer them.

They ship as package data under `shipped/` (a few MB of safetensors, the same bytes on every machine)
and load through the same `from_pretrained` code as any base. The recipe that made them stays here
(`atelier tiny build NAME --out DIR`, build.py); README "Built-in bases" records the commit, the
command and the checksums (each folder's SHA256SUMS).
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("tiny-sd", "tiny-sdxl")
SHIPPED = Path(__file__).resolve().parent / "shipped"


def shipped_folder(name: str) -> Path:
    if name not in NAMES:
        raise ValueError(f"unknown built-in base {name!r}; known: {', '.join(NAMES)}")
    return SHIPPED / name
