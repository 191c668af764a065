"""Bases for the bench and the real-size tests: a configured one by id, or the published SD1.5 /
SD2.1 / SDXL architectures (core/bases/architectures.py) with random weights.

Throughput, memory and every shape-dependent code path depend on the architecture only, so a
random-weight folder written once (in bf16, a few seconds per GB) stands in for a downloaded base and
loads through the same `from_pretrained` code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.bases.architectures import CLIP_VOCAB, KNOWN, Architecture


def sized_tokenizer(folder: Path) -> Any:
    """The tiny bases' offline byte-level CLIP tokenizer, its vocabulary padded to CLIP's 49408.

    The padding entries are multi-character symbols a merge-free BPE never produces, so text
    tokenizes exactly as before; what they buy is `len(tokenizer) == vocab_size`, so a token added
    by Textual Inversion gets id 49408, the row a resized real-size embedding matrix gives it.
    """
    from core.bases.tiny.components import load_tokenizer, write_tokenizer

    write_tokenizer(folder)
    vocab_file = folder / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    vocab |= {f"<bench-pad-{i}>": i for i in range(len(vocab), CLIP_VOCAB)}
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == CLIP_VOCAB, len(tokenizer)
    return tokenizer


SIZES = {"sd15": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # bench names -> core.bases.architectures names
# Written once per machine and reused (SD1.5 ~3 GB, SD2.1 ~3.5 GB, SDXL ~8 GB).
SIZED_CACHE = Path(os.environ.get("ATELIER_REALSIZE_CACHE", Path(tempfile.gettempdir()) / "atelier-realsize"))


def _special_tokens() -> dict[str, int]:
    from core.bases.tiny.components import BOS_ID, EOS_ID

    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


def _components(arch: Architecture) -> dict[str, torch.nn.Module]:
    """Every model of `arch`, built from its config dicts on the meta device (no memory, no init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    with torch.device("meta"):
        models: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel(**arch.unet),
            "vae": AutoencoderKL(**arch.vae, sample_size=arch.resolution),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoders[0], **_special_tokens())),
        }
        if len(arch.text_encoders) > 1:
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**arch.text_encoders[1], **_special_tokens())
            )
        if arch.image_encoder is not None:
            models["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.image_encoder))
    return models


@torch.no_grad()
def random_weights(module: torch.nn.Module, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Give a meta-device model real tensors in `dtype`, initialised like torch's defaults (uniform
    within 1/sqrt(fan_in)), norms at one, biases at zero, embeddings N(0, 0.02) as CLIP's. Filling
    one low-precision tensor at a time keeps host memory at the model's size in `dtype`, where
    building it normally would first allocate and initialise it all in fp32."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=dtype)
            if isinstance(sub, norms) and name == "weight":
                tensor.fill_(1.0)
            elif name == "bias" or isinstance(sub, norms):
                tensor.zero_()
            elif isinstance(sub, torch.nn.Embedding) or tensor.dim() < 2:
                tensor.normal_(0.0, 0.02, generator=generator)
            else:
                bound = 1.0 / math.sqrt(tensor[0].numel())
                tensor.uniform_(-bound, bound, generator=generator)
            sub._parameters[name] = torch.nn.Parameter(tensor, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                # Only non-persistent buffers (CLIP's position ids) exist here: not saved, rebuilt on load.
                sub._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def _model_index(arch: Architecture) -> dict[str, Any]:
    common = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if arch.family == "sdxl":
        return {
            "_class_name": "StableDiffusionXLPipeline",
            **common,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        }
    return {
        "_class_name": "StableDiffusionPipeline",
        **common,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def write_sized_base(size: str, folder: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A complete diffusers folder of the published `size` architecture (sd15, sd2, sdxl) with random
    weights stored in `dtype`, plus an IP-Adapter image encoder (OpenCLIP ViT-H) in `image_encoder/`.
    Loads with the same `from_pretrained` code as a downloaded base."""
    from diffusers import DDIMScheduler

    arch = KNOWN[SIZES[size]]
    generator = torch.Generator().manual_seed(0)
    params = {}
    models = _components(arch)
    for name in list(models):
        model = models.pop(name)  # one component in memory at a time
        random_weights(model, dtype, generator)
        model.save_pretrained(folder / name, safe_serialization=True)
        params[name] = sum(p.numel() for p in model.parameters())
        del model
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=arch.prediction_type,
    ).save_pretrained(folder / "scheduler")
    sized_tokenizer(folder / "tokenizer")
    if arch.family == "sdxl":
        sized_tokenizer(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps(_model_index(arch), indent=2))
    return {"parameters": params}


def sized_recipe(size: str) -> str:
    """Changes whenever the architecture or this builder does, so cached folders are rebuilt."""
    digest = hashlib.sha256(json.dumps(KNOWN[SIZES[size]].__dict__, sort_keys=True, default=str).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def ensure_sized_base(size: str, cache: Path) -> Path:
    """The folder of a random-weight `size` base under `cache`, written once (atomically) per recipe."""
    from core.bases.loader import _materialise

    marker = {"source": f"sized:{size}", "recipe": sized_recipe(size)}
    return _materialise(cache / f"random-{size}", marker, lambda folder: write_sized_base(size, folder))


def sized_base(size: str, folder: Path, device: torch.device) -> Any:
    """SD1.5 (`sd15`), SD2.1 (`sd2`) or SDXL (`sdxl`) shapes, random weights, fp32 on `device`,
    written under `folder` once and loaded through `core.bases.loader.load_base` as any base is."""
    from core.bases.loader import load_base
    from core.config import Settings

    path = ensure_sized_base(size, folder)
    model_id = f"random-{size}"
    settings = Settings(base_models={model_id: str(path)}, model_cache=folder)
    return load_base(model_id, settings=settings, device=device)


def load_named_base(model_id: str) -> Any:
    """A configured base (tiny-sd, tiny-sdxl, an allowed hub model), fp32 on the host."""
    from core.bases.loader import load_base
    from core.config import get_settings

    return load_base(model_id, settings=get_settings(), device="cpu")
