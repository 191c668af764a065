"""The phases a training job goes through, in order; a job skips those it does not need.

Each phase counts `done` of `total` in its own units. Torch-free, so the API (which never imports
torch) can name them.
"""

from __future__ import annotations

from typing import Literal, get_args

Phase = Literal[
    "downloading_base",  # a base from storage or the hub is copied locally; units: files (hub: 0/1)
    "loading_base",  # the base's models are read into memory; units: models
    "generating_class_images",  # DreamBooth's prior images, made by the base; units: images
    "caching_latents",  # every training image encoded once by the VAE; units: images
    "training",  # units: optimizer steps (the same as progress.step/total)
    "exporting",  # the artifact and its exports are written; 0/1, then 1/1
    "uploading",  # the artifact goes to storage; units: files
]
PHASES: tuple[str, ...] = get_args(Phase)
