"""Materialise an allowed base model as a local diffusers folder, and load it.

Every source ends as a folder on disk, and every component is loaded from it with
`from_pretrained(folder, subfolder=...)`: the tiny built-in bases go through exactly the code that
loads a real SD1.5 or SDXL folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from core.bases.allow_list import (
    BaseModelUnavailable,
    describe_folder,
    get_base_model_info,
    split_source,
)

log = logging.getLogger(__name__)

FetchPrefix = Callable[[str, Path], None]  # (storage prefix, empty local folder) -> files in it
PhaseCallback = Callable[[str, int, int], None]  # (phase, done, total): see core.training.progress
SUMS = "SHA256SUMS"  # beside every shipped built-in base: its files' checksums
MARKER = "atelier_base.json"  # written last into a cached folder: no marker, not complete
# Enough of a hub repo to run the pipeline: configs, tokenizers and the default safetensors
# weights, never the .ckpt / .bin / fp16 duplicates some repos also carry.
HF_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model*.safetensors",
    "*/model*.safetensors",
]


@dataclass
class BaseModels:
    model_id: str
    family: Literal["sd", "sdxl"]
    path: Path
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any | None
    text_encoder_2: Any | None
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPMScheduler with the folder's training config
    # The frozen CLIP image encoder IP-Adapter reads (a `CLIPVisionModelWithProjection` folder), if any.
    image_encoder_path: Path | None = None

    @property
    def fingerprint(self) -> str:
        """Changes whenever the base's weights may have: names caches derived from the base."""
        return base_fingerprint(self.model_id, self.path)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def resolution(self) -> int:
        # Each VAE level after the first halves the image.
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)


IMAGE_ENCODER = "image_encoder"


def base_fingerprint(model_id: str, path: Path) -> str:
    import hashlib

    digest = hashlib.sha256(model_id.encode())
    # Our marker (fetched bases: the source), a built-in's checksums, or the UNet config otherwise.
    for name in (MARKER, SUMS, "unet/config.json", "model_index.json"):
        candidate = path / name
        if candidate.is_file():
            digest.update(name.encode() + candidate.read_bytes())
            break
    return digest.hexdigest()[:16]


def image_encoder_folder(path: Path, settings: Any) -> Path | None:
    """The image encoder for a base: the folder's own `image_encoder/` (the tiny bases ship one),
    else `settings.image_encoder` (e.g. a local copy of h94/IP-Adapter's `models/image_encoder`)."""
    own = path / IMAGE_ENCODER
    if (own / "config.json").is_file():
        return own
    configured = getattr(settings, "image_encoder", None)
    return Path(configured) if configured else None


def ensure_local(
    model_id: str,
    *,
    settings: Any,
    fetch_prefix: FetchPrefix | None = None,
    on_phase: PhaseCallback | None = None,
) -> Path:
    """The local diffusers folder for an allowed base, fetching it on first use (built-ins ship with
    the package). `on_phase` hears of a hub download (`downloading_base`); a `fetch_prefix` reports
    its own download."""
    kind, value = split_source(get_base_model_info(model_id, settings).source)
    if kind == "local":
        folder = Path(value)
        if not (folder / "model_index.json").is_file():
            raise BaseModelUnavailable(model_id, f"{folder} is not a diffusers folder (no model_index.json)")
        return folder
    if kind == "hf":
        if on_phase is not None:
            on_phase("downloading_base", 0, 1)  # the hub client counts bytes only on its own bar
        folder = _hf_snapshot(model_id, value)
        if on_phase is not None:
            on_phase("downloading_base", 1, 1)
        return folder
    if kind == "builtin":
        return _ensure_builtin(model_id, value)
    cache = Path(settings.model_cache)
    if fetch_prefix is None:
        raise BaseModelUnavailable(model_id, "a storage: source needs a fetch_prefix to download it")
    return _materialise(
        cache / model_id, {"source": f"storage:{value}"}, lambda folder: fetch_prefix(value, folder)
    )


def _ensure_builtin(model_id: str, name: str) -> Path:
    from core.bases.tiny import NAMES, shipped_folder

    if name not in NAMES:
        raise BaseModelUnavailable(model_id, f"no built-in base {name!r}; built-ins: {', '.join(NAMES)}")
    # Shipped as package data, the same bytes on every machine: nothing to build or copy.
    return shipped_folder(name)


def _hf_snapshot(model_id: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated: all mean "not here"
        raise BaseModelUnavailable(model_id, f"cannot fetch {repo_id!r} from the hub ({exc})") from exc


def _complete(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(key) == value for key, value in expected.items())


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # An OS lock is released when its holder dies, so a killed build never blocks the next one.
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _share(folder: Path) -> None:
    # mkdtemp and safetensors create owner-only files; the model cache is shared by users.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _materialise(target: Path, marker: dict[str, Any], produce: Callable[[Path], Any]) -> Path:
    """Make `target` by `produce(empty folder)` once across processes: built beside it, then renamed
    into place, so readers never see half a folder."""
    if _complete(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _complete(target, marker):  # another process made it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            details = produce(staging)
            _share(staging)
            (staging / MARKER).write_text(json.dumps({**marker, "details": details}, indent=2))
            if target.exists():  # an older recipe or another source: swap, then delete
                stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
                target.rename(stale)
                staging.rename(target)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("base model ready", extra={"path": str(target), **marker})
    return target


def load_base(
    model_id: str,
    *,
    settings: Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float32,
    fetch_prefix: FetchPrefix | None = None,
    on_phase: PhaseCallback | None = None,
) -> BaseModels:
    """Every component of the base, separately, for training. `dtype` is one dtype for all, or one
    per component name (`unet`, `vae`, `text_encoder`, `text_encoder_2`; missing names: fp32), so
    frozen components load straight into bf16 instead of passing through an fp32 copy. `on_phase`
    hears of a build or download (see `ensure_local`), then `loading_base` per model loaded."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = ensure_local(model_id, settings=settings, fetch_prefix=fetch_prefix, on_phase=on_phase)
    family = describe_folder(path)[0] or "sd"
    sdxl = family == "sdxl"
    models, loaded = (4 if sdxl else 3), 0
    if on_phase is not None:
        on_phase("loading_base", 0, models)

    def model(cls: Any, subfolder: str, dtype_arg: str) -> Any:
        nonlocal loaded
        wanted = dtype.get(subfolder, torch.float32) if isinstance(dtype, Mapping) else dtype
        module = cls.from_pretrained(path, subfolder=subfolder, **{dtype_arg: wanted}).to(device)
        loaded += 1
        if on_phase is not None:
            on_phase("loading_base", loaded, models)
        return module

    return BaseModels(
        model_id=model_id,
        family=family,
        path=path,
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=model(CLIPTextModel, "text_encoder", "dtype"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2") if sdxl else None,
        text_encoder_2=model(CLIPTextModelWithProjection, "text_encoder_2", "dtype") if sdxl else None,
        vae=model(AutoencoderKL, "vae", "torch_dtype"),
        unet=model(UNet2DConditionModel, "unet", "torch_dtype"),
        # Whatever sampler the folder ships (DDIM, PNDM, Euler), training adds noise the DDPM way
        # with the same betas and prediction type.
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        image_encoder_path=image_encoder_folder(path, settings),
    )


def load_pipeline(
    model_id: str,
    *,
    settings: Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fetch_prefix: FetchPrefix | None = None,
) -> Any:
    """The base's own pipeline class, with the folder's scheduler."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = ensure_local(model_id, settings=settings, fetch_prefix=fetch_prefix)
    if describe_folder(path)[0] == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    return pipe.to(device)
