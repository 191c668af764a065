"""LoRA → the kohya / A1111 / ComfyUI `.safetensors` (`<name>.safetensors`, `<lora:name:1>` in A1111).

Read from the primary `pytorch_lora_weights.safetensors` (PEFT keys): `unet.<path>.lora_A.weight`
becomes `lora_unet_<path with "." → "_">.lora_down.weight`, `lora_B` becomes `lora_up`, and every
module gets an `.alpha`. Four facts decide the details:
- `<path>` is the module's path in the UNet kohya trains on, which differs by family
  (kohya-ss/sd-scripts: `library/sdxl_train_util.py` turns a diffusers SDXL UNet into its
  `SdxlUNet2DConditionModel` from `library/sdxl_original_unet.py`; `networks/lora.py` names each
  module `lora_unet_` + its path). SD1/2 keep diffusers' paths; SDXL has Stability's, numbered as
  in `ldm_layout.unet_table`: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `lora_unet_middle_block_1_…`, `lora_unet_output_blocks_0_1_…`. A resnet's conv1 / conv2 /
  conv_shortcut are `in_layers_2` / `out_layers_3` / `skip_connection` there; transformer internals
  (proj_in/out, ff_net_0_proj, ff_net_2, attn1/2_to_q/k/v/out_0) keep diffusers' names. diffusers
  reads these names back from the pipeline's UNet config (`_maybe_map_sgm_blocks_to_diffusers` in
  `loaders/lora_conversion_utils.py`) but DROPS them when a file mixes both schemes, so a UNet
  module without a Stability name fails the export rather than ship a file that loads partly.
  ComfyUI (`comfy/lora.py`, `model_lora_keys_unet`) accepts both schemes; A1111
  (`extensions-builtin/Lora/networks.py`) converts diffusers names with SD1's block arithmetic
  only and looks SDXL files up under Stability's names.
- `.alpha` is the alpha we TRAINED with, not the rank diffusers' `convert_state_dict_to_kohya`
  writes: loaders scale by alpha / rank, so alpha = rank applies an alpha-2 rank-4 LoRA at twice the
  strength it was trained at. Text encoders train at alpha·te_rank/rank (core/methods/lora.py).
- Text-encoder paths keep the `text_model.` level A1111 and ComfyUI match against, even though
  transformers ≥ 5 dropped it from the module tree (diffusers strips it again when it loads).
- Nothing but `lora_down` / `lora_up` / `alpha` tensors: diffusers' kohya loader raises on leftovers.
Conv LoRA keeps its 4-D shapes (down [r, in, kh, kw], up [out, r, 1, 1]: the same in both layouts).

`describe_base` and `modelspec` are shared with the textual-inversion exporter.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from core.exports.ldm_layout import renamed, unet_table
from core.methods.lora import TEXT_ENCODERS, WEIGHT_NAME

NETWORK_MODULE = "networks.lora"
# kohya's text-encoder prefixes: SD1/2 have one encoder, SDXL's CLIP-L and OpenCLIP-G are te1 / te2.
TEXT_PREFIXES = {
    "sd": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
PEFT_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# modelspec.implementation as kohya's trainers write it: SD1/2 LoRAs carry diffusers' key names,
# SDXL LoRAs and embeddings are described against Stability's reference code.
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class BaseInfo:
    """What tools need to know about the base a LoRA or embedding was trained on."""

    family: str  # "sd" | "sdxl"
    v2: bool  # an SD2-style base: OpenCLIP-H text encoder
    prediction: str  # "v" | "epsilon"
    resolution: int

    @property
    def version(self) -> str:  # kohya's ss_base_model_version
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        return "sd_v2" if self.v2 else "sd_v1"

    @property
    def architecture(self) -> str:  # modelspec architecture of the base
        if self.family == "sdxl":
            return "stable-diffusion-xl-v1-base"
        if self.v2:
            return "stable-diffusion-v2-768-v" if self.prediction == "v" else "stable-diffusion-v2-512"
        return "stable-diffusion-v1"


def read_config(base_path: Path, name: str) -> dict[str, Any]:
    path = base_path / name
    return json.loads(path.read_text()) if path.is_file() else {}


def describe_base(ctx: Any) -> BaseInfo:
    """From the base folder's configs. SD2 is told apart by its text encoder (OpenCLIP-H: 1024 wide,
    plain GELU; SD1's CLIP-L is 768 wide with quick-GELU), not by v-prediction: a v-prediction SD1
    finetune is still an SD1 model to the tools that load it, and SD2-base predicts epsilon."""
    base = Path(ctx.base_path)
    text = read_config(base, "text_encoder/config.json")
    v2 = ctx.family == "sd" and (text.get("hidden_size") == 1024 or text.get("hidden_act") == "gelu")
    prediction = read_config(base, "scheduler/scheduler_config.json").get("prediction_type", "epsilon")
    sample_size = read_config(base, "unet/config.json").get("sample_size", 64)
    vae_levels = len(read_config(base, "vae/config.json").get("block_out_channels", [0] * 4))
    return BaseInfo(
        family=ctx.family,
        v2=v2,
        prediction="v" if prediction == "v_prediction" else "epsilon",
        resolution=int(sample_size) * 2 ** (vae_levels - 1),
    )


def modelspec(
    info: BaseInfo, *, adapter: str, implementation: str, title: str, timestamp: float
) -> dict[str, str]:
    """The SAI model-spec keys (sai_model_spec 1.0.0) of an adapter ("lora" / "textual-inversion")."""
    date = datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.UTC).isoformat()
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{info.architecture}/{adapter}",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": date,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.prediction_type": info.prediction,
    }


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """modelspec.hash_sha256: sha256 of the file's tensor bytes (everything after the header),
    which the metadata does not change."""
    data = save(tensors)
    header = int.from_bytes(data[:8], "little")
    return "0x" + hashlib.sha256(data[8 + header :]).hexdigest()


def trained_alphas(params: Any, adapter_metadata: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """(rank, alpha) per component as core/methods/lora.py trained them, checked against the
    LoraConfig the primary file carries: a mismatch means the export would load at another strength."""
    te_rank = params.text_encoder_rank or params.rank
    expected = {"unet": (params.rank, params.effective_alpha)}
    for name in TEXT_ENCODERS:
        expected[name] = (te_rank, params.effective_alpha * te_rank / params.rank)
    for name, (rank, alpha) in expected.items():
        if f"{name}.r" not in adapter_metadata:
            continue
        recorded = (adapter_metadata[f"{name}.r"], float(adapter_metadata[f"{name}.lora_alpha"]))
        patterns = adapter_metadata.get(f"{name}.rank_pattern") or adapter_metadata.get(
            f"{name}.alpha_pattern"
        )
        if recorded != (rank, alpha) or patterns:
            raise ValueError(
                f"{name}: the artifact's LoraConfig says (rank, alpha) {recorded}"
                f"{' with per-module patterns' if patterns else ''}; its params say {(rank, alpha)}"
            )
    return expected


def kohya_module(component: str, path: str, family: str) -> str:
    """`unet` + `down_blocks.1.attentions.0.proj_in` → `lora_unet_down_blocks_1_attentions_0_proj_in`.

    A UNet `path` must already be in the layout kohya trains the family on (see `sgm_unet_state`)."""
    if component == "unet":
        prefix = "lora_unet"
    else:
        try:
            prefix = TEXT_PREFIXES[family][component]
        except KeyError:
            raise ValueError(f"a {family} LoRA has no component {component!r}") from None
        if not path.startswith("text_model."):
            path = f"text_model.{path}"
    return f"{prefix}_{path.replace('.', '_')}"


def sgm_unet_state(state: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`state` with its `unet.` tensors under Stability's module names (`unet.input_blocks.4.1.…`),
    the layout kohya trains SDXL on; other tensors pass unchanged. A UNet tensor without such a
    name raises ValueError."""
    if not unet_config.get("down_block_types"):
        raise ValueError("the base has no UNet config: its Stability module names are unknown")
    unet = {key.removeprefix("unet."): t for key, t in state.items() if key.startswith("unet.")}
    others = {key: t for key, t in state.items() if not key.startswith("unet.")}
    sgm = renamed(unet, unet_table(unet_config), "unet")
    return others | {f"unet.{key}": t for key, t in sgm.items()}


def kohya_tensors(
    state: dict[str, torch.Tensor],
    alphas: dict[str, tuple[int, float]],
    family: str,
    *,
    unet_config: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The primary file's PEFT tensors under kohya's names; an SDXL UNet needs its `unet_config`."""
    if family == "sdxl":
        state = sgm_unet_state(state, unet_config or {})
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        path, _, suffix = rest.rpartition(".lora_")
        kohya_suffix = PEFT_SUFFIXES.get(f"lora_{suffix}")
        if not path or kohya_suffix is None or component not in alphas:
            # DoRA magnitudes, biases...: no kohya equivalent here, and a partial file loads wrong.
            raise ValueError(f"no kohya key for LoRA tensor {key!r}")
        module = kohya_module(component, path, family)
        out[f"{module}.{kohya_suffix}"] = tensor.contiguous()
        rank, alpha = alphas[component]
        if suffix == "A.weight" and tensor.shape[0] != rank:
            raise ValueError(f"{key} has rank {tensor.shape[0]}, trained with {rank}")
        out[f"{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _training_metadata(ctx: Any, info: BaseInfo, timestamp: float) -> dict[str, str]:
    """kohya's `ss_*` training keys we know for certain (nothing guessed: unknown keys are left out)."""
    params, training = ctx.params, ctx.training
    resolution = training.resolution or info.resolution
    conv = params.targets == "attention+conv+ff"
    lr = str(training.learning_rate)
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(params.rank),
        "ss_network_alpha": str(params.effective_alpha),
        "ss_network_args": json.dumps(
            {"conv_dim": str(params.rank), "conv_alpha": str(params.effective_alpha)} if conv else {}
        ),
        "ss_network_dropout": str(params.dropout),
        "ss_network_train_unet_only": str(not params.train_text_encoder),
        "ss_base_model_version": info.version,
        "ss_sd_model_name": ctx.base_model,
        "ss_output_name": ctx.name,
        "ss_training_finished_at": str(timestamp),
        "ss_steps": str(training.max_steps),
        "ss_max_train_steps": str(training.max_steps),
        "ss_seed": str(training.seed),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_learning_rate": lr,
        "ss_unet_lr": lr,
        "ss_lr_scheduler": training.lr_scheduler,
        "ss_lr_warmup_steps": str(training.warmup_steps),
        "ss_optimizer": training.optimizer,
        "ss_batch_size_per_device": str(training.batch_size),
        "ss_gradient_accumulation_steps": str(training.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(training.gradient_checkpointing),
        "ss_max_grad_norm": str(training.max_grad_norm),
        "ss_noise_offset": str(training.noise_offset),
    }
    if params.train_text_encoder:
        metadata["ss_text_encoder_lr"] = lr
    if training.min_snr_gamma is not None:
        metadata["ss_min_snr_gamma"] = str(training.min_snr_gamma)
    if info.family == "sd":  # kohya omits ss_v2 for SDXL
        metadata["ss_v2"] = str(info.v2)
    images = (ctx.metrics or {}).get("images")
    if images is not None:
        metadata["ss_num_train_images"] = str(images)
    return metadata


def export_kohya(artifact_dir: Path, out_dir: Path, ctx: Any) -> list[str]:
    """`<ctx.name>.safetensors` in kohya keys with the trained alphas and ss_* / modelspec.* metadata."""
    with safe_open(str(artifact_dir / WEIGHT_NAME), "pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        adapter_metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    alphas = trained_alphas(ctx.params, adapter_metadata)
    unet_config = read_config(Path(ctx.base_path), "unet/config.json")
    tensors = kohya_tensors(state, alphas, ctx.family, unet_config=unet_config)
    info = describe_base(ctx)
    timestamp = time.time()
    implementation = IMPL_STABILITY if info.family == "sdxl" else IMPL_DIFFUSERS
    metadata = {
        **_training_metadata(ctx, info, timestamp),
        **modelspec(info, adapter="lora", implementation=implementation, title=ctx.name, timestamp=timestamp),
        "modelspec.hash_sha256": tensor_sha256(tensors),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{ctx.name}.safetensors"
    save_file(tensors, str(out_dir / name), metadata=metadata)
    return [name]
