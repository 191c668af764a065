"""The generate worker as the composition tests drive it (core.generation.inference on local storage
and the tiny-sd folder), the scenes they train on, and the API settings with extra bases.

The fixtures are shared by assignment (`worker = fixtures.worker`), as tests/test_training_loop.py's
are: `fresh_worker_caches` is autouse, so each test module that generates opts in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.bases.tiny import shipped_folder
from core.config import Settings
from core.generation import inference
from core.generation.inference import Use, generate_images
from core.generation.params import GenerationSpec
from core.jobs import artifact
from core.models import Artifact
from core.spec.job import JobSpec
from core.storage.artifacts import read_manifest
from core.storage.base import Storage, upload_dir
from core.storage.local import LocalStorage
from core.training.progress import NullHooks
from tests import test_training_loop as shared

CPU = torch.device("cpu")
MAGENTA = (255, 0, 255)
GREY, NEAR_BLACK = (128, 128, 128), (20, 20, 20)
PROMPT = "a photo of <sks>"  # the textual inversion's token, so every artifact has its say


@pytest.fixture(autouse=True)
def fresh_worker_caches() -> Iterator[None]:
    # The pipeline LRU is per process: each test starts from bases loaded afresh from disk.
    inference._pipelines.clear()
    yield
    inference._pipelines.clear()


def scene(
    fg: tuple[int, int, int], centre: tuple[float, float], bg: tuple[int, int, int], rng: Any, side: int = 12
) -> tuple[Image.Image, Image.Image]:
    """A square of `fg` on a slightly noisy `bg` (32 px), and its mask (the conditioning image)."""
    noise = rng.integers(-8, 9, size=(32, 32, 3))
    image = Image.fromarray(np.clip(np.array(bg) + noise, 0, 255).astype(np.uint8))
    mask = Image.new("RGB", (32, 32))
    left, top = round(centre[0] * 32 - side / 2), round(centre[1] * 32 - side / 2)
    for target, fill in ((image, fg), (mask, (255, 255, 255))):
        ImageDraw.Draw(target).rectangle((left, top, left + side - 1, top + side - 1), fill=fill)
    return image, mask


def train_artifact(
    base_path: Path, workdir: Path, params: dict[str, Any], items: list[Any], **training: Any
) -> Path:
    base = shared.load_tiny(base_path.parent, base_path.name)
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params=params,
        training={"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "seed": 1, **training},
    )
    return artifact.train_artifact(
        spec=spec, base=base, items=items, workdir=workdir, hooks=NullHooks(), device=CPU
    ).artifact_dir


@dataclass
class Worker:
    """core.generation.inference as the generate worker runs it, over local storage and the tiny-sd folder."""

    settings: Settings
    storage: Storage

    def upload(self, method: str, folder: Path, artifact_id: str | None = None) -> Artifact:
        """An artifact row for `folder`, whose files are uploaded where the row says."""
        artifact_id = artifact_id or f"art_{method}"
        prefix = f"jobs/{artifact_id}/attempt-1"
        upload_dir(self.storage, folder, prefix)
        return Artifact(
            id=artifact_id,
            tenant_id="tenant",
            job_id=f"job_{artifact_id}",
            method=method,
            base_model="tiny-sd",
            storage_prefix=prefix,
            manifest=read_manifest(folder),
        )

    def generate(self, uses: list[Use] | None = None, **fields: Any) -> np.ndarray:
        spec = GenerationSpec.model_validate(
            {"base_model": "tiny-sd", "prompt": PROMPT, "steps": 4, "seed": 3, **fields}
        )
        images = generate_images(
            spec=spec, uses=uses or [], settings=self.settings, storage=self.storage, output_type="np"
        )
        return np.stack(images)


@pytest.fixture
def worker(tiny_cache: Path, tmp_path: Path) -> Worker:
    settings = Settings(
        home=tmp_path,
        model_cache=tmp_path / "models",
        base_models={"tiny-sd": str(shipped_folder("tiny-sd"))},  # the shipped folder, as a local base
        device="cpu",
    )
    return Worker(settings, LocalStorage(tmp_path / "storage"))


def local_base(tiny_cache: Path, folder: Path, **unet_changes: Any) -> str:
    """A local diffusers folder with tiny-sd's configs (all the API reads), UNet config changed."""
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shipped_folder("tiny-sd") / name, folder / name)
    unet = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps({**unet, **unet_changes}))
    return str(folder)


@pytest.fixture
def bases(api_settings: Settings, tiny_cache: Path, tmp_path: Path) -> Settings:
    api_settings.base_models.update(
        {
            "tiny-sd-copy": "builtin:tiny-sd",  # another name for the same base
            "sd-finetune": local_base(tiny_cache, tmp_path / "finetune"),  # same family and architecture
            "sd-wide": local_base(tiny_cache, tmp_path / "wide", cross_attention_dim=48),  # an "SD 2"
            "hub-sd": "hf:example/sd",  # not inspectable by the API
        }
    )
    return api_settings
