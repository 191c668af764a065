"""The base-model allow-list: which ids a job may name, and what is known about each without torch.

The API process imports this module to validate requests and serve `GET /v1/base-models`, so it
must never import torch or diffusers; loading lives in core/bases/loader.py.

Sources (Settings.base_models, id -> source):
  builtin:<name>     a tiny base built offline by core/bases/tiny on first use
  hf:<repo id>       a Hugging Face repo, where a hub or a populated HF cache is reachable
  storage:<prefix>   a diffusers folder uploaded to our object storage
  /abs/path          a diffusers folder on the worker's disk
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.bases.architectures import (
    KNOWN,
    Architecture,
    Family,
    hub_architecture,
    pipeline_family,
    read_folder,
    read_json,
)

SourceKind = Literal["builtin", "hf", "storage", "local"]

# What the built-in bases are, known without building them (core/bases/tiny makes 32 px images), and
# their architecture signatures (see `architecture_of_folder`), so the API can check artifacts
# against a built-in base it has never built; tests/test_composition_worker.py compares them with the
# built folders.
BUILTINS: dict[str, tuple[Family, int]] = {
    name: (KNOWN[name].family, KNOWN[name].resolution) for name in ("tiny-sd", "tiny-sdxl")
}
BUILTIN_ARCHITECTURES: dict[str, dict[str, Any]] = {name: KNOWN[name].signature() for name in BUILTINS}


class BaseModelNotAllowed(Exception):
    def __init__(self, model_id: str, allowed: list[str]) -> None:
        self.model_id = model_id
        self.allowed = allowed
        super().__init__(f"base model {model_id!r} is not allowed; allowed: {', '.join(allowed) or 'none'}")


class BaseModelUnavailable(Exception):
    """An allowed base that cannot be materialised here (missing folder, unreachable hub...)."""

    def __init__(self, model_id: str, reason: str) -> None:
        self.model_id = model_id
        super().__init__(f"base model {model_id!r} is unavailable: {reason}")


@dataclass(frozen=True)
class BaseModelInfo:
    id: str
    source: str
    family: Family | None
    resolution: int | None
    builtin: bool

    @property
    def source_kind(self) -> SourceKind:
        return split_source(self.source)[0]

    def to_public(self) -> dict[str, Any]:
        # The source itself stays private: it can name server paths and storage prefixes.
        return {
            "id": self.id,
            "object": "base_model",
            "family": self.family,
            "resolution": self.resolution,
            "builtin": self.builtin,
            "source_kind": self.source_kind,
        }


def split_source(source: str) -> tuple[SourceKind, str]:
    for kind in ("builtin", "hf", "storage"):
        if source.startswith(f"{kind}:"):
            return kind, source[len(kind) + 1 :]  # type: ignore[return-value]
    if Path(source).is_absolute():
        return "local", source
    raise ValueError(f"unrecognised base model source {source!r}")


def list_base_models(settings: Any) -> list[BaseModelInfo]:
    return [_info(model_id, source, settings) for model_id, source in settings.base_models.items()]


def get_base_model_info(model_id: str, settings: Any) -> BaseModelInfo:
    source = settings.base_models.get(model_id)
    if source is None:
        raise BaseModelNotAllowed(model_id, sorted(settings.base_models))
    return _info(model_id, source, settings)


def _info(model_id: str, source: str, settings: Any) -> BaseModelInfo:
    kind, value = split_source(source)
    if kind == "local" and model_id not in settings.base_architectures:
        family, resolution = describe_folder(Path(value))
        return BaseModelInfo(model_id, source, family, resolution, builtin=False)
    arch = architecture_for(model_id, settings)
    family, resolution = (arch.family, arch.resolution) if arch else (None, None)
    return BaseModelInfo(model_id, source, family, resolution, builtin=kind == "builtin")


def architecture_for(model_id: str, settings: Any) -> Architecture | None:
    """An allowed base's architecture without torch or a download, or None where it cannot be
    known here: a declared one (Settings.base_architectures, for same-architecture fine-tunes)
    first, then built-ins from the table, local folders from their configs, and the published hub
    repos users name most (core.bases.architectures.HUB_REPOS). storage: bases are known only when
    declared. Raises BaseModelNotAllowed."""
    source = settings.base_models.get(model_id)
    if source is None:
        raise BaseModelNotAllowed(model_id, sorted(settings.base_models))
    declared = settings.base_architectures.get(model_id)
    if declared is not None:
        return KNOWN[declared]
    kind, value = split_source(source)
    if kind == "builtin":
        return KNOWN.get(value)
    if kind == "local":
        return read_folder(Path(value))
    if kind == "hf":
        return hub_architecture(value)
    return None


def describe_folder(folder: Path) -> tuple[Family | None, int | None]:
    """Family and native resolution of a diffusers pipeline folder, from its JSON configs only."""
    index = read_json(folder / "model_index.json")
    if index is None:
        return None, None
    family = pipeline_family(index)
    unet = read_json(folder / "unet" / "config.json") or {}
    vae = read_json(folder / "vae" / "config.json") or {}
    sample_size, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(sample_size, int) or not blocks:
        return family, None
    # Each VAE level after the first halves the image: latent side * 2**(levels-1) = pixels.
    return family, sample_size * 2 ** (len(blocks) - 1)


def architecture_of_folder(folder: Path) -> dict[str, Any] | None:
    """A small signature of what an artifact's tensors must fit, from the folder's JSON configs:
    the UNet's channel widths and cross-attention width, and each text encoder's width. SD 1.x and
    2.x share a family but not this (768 vs 1024 wide); two SD 1.5 fine-tunes share both."""
    unet = read_json(folder / "unet" / "config.json")
    if unet is None or "block_out_channels" not in unet:
        return None
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        config = read_json(folder / name / "config.json")
        if config is not None and "hidden_size" in config:
            widths.append(config["hidden_size"])
    return {
        "block_out_channels": list(unet["block_out_channels"]),
        "cross_attention_dim": unet.get("cross_attention_dim"),
        "text_widths": widths,
    }


@dataclass(frozen=True)
class BaseDescription:
    """What a compatibility check knows about a base: None where it cannot tell without fetching."""

    id: str
    family: Family | None
    architecture: dict[str, Any] | None


def describe_base(model_id: str, settings: Any) -> BaseDescription:
    """Family and architecture of an allowed base, where the API can see them: local folders from
    their configs, everything else as `architecture_for` knows it (hf: and storage: bases it does
    not know only once fetched by a worker, so not here). Raises BaseModelNotAllowed."""
    info = get_base_model_info(model_id, settings)
    kind, value = split_source(info.source)
    if kind == "local" and model_id not in settings.base_architectures:
        return BaseDescription(model_id, info.family, architecture_of_folder(Path(value)))
    arch = architecture_for(model_id, settings)
    return BaseDescription(model_id, info.family, arch.signature() if arch else None)
