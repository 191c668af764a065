"""LoRA: peft low-rank adapters on the UNet (attention, optionally convs and feed-forward) and,
optionally, on the text encoder(s).

The artifact is diffusers' `pytorch_lora_weights.safetensors` in PEFT key naming (`unet.…lora_A.weight`,
`text_encoder.…`, `text_encoder_2.…`), written by the pipeline class's `save_lora_weights` with each
adapter's LoraConfig as metadata. Two things we measured decide this:
- the state dict is NOT passed through `convert_state_dict_to_diffusers`: with non-attention targets
  that conversion makes the loader drop the attention weights silently;
- without the adapter metadata, diffusers loads an alpha != rank LoRA at scale 1 instead of alpha/rank.
The LoRA tests load the file into a fresh pipeline and check every trained tensor and the outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from core.methods.base import Trainable
from core.spec.methods import LoraParams
from core.spec.training import TrainingParams

if TYPE_CHECKING:
    from core.methods.context import ArtifactUse, GenerationContext

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"  # the adapter name peft's add_adapter uses while training

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Resnet convs (conv_shortcut exists only where channels change), the transformer blocks'
# feed-forward, and the 1x1 / linear projections into and out of each transformer block. The
# up/down-samplers and time embeddings stay frozen, as in kohya's LoCon preset.
CONV_FF = ["conv1", "conv2", "conv_shortcut", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def unet_targets(targets: str) -> list[str]:
    return ATTENTION + CONV_FF if targets == "attention+conv+ff" else list(ATTENTION)


def _config(rank: int, alpha: float, dropout: float, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )


def _lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _metadata(module: Any) -> dict[str, Any]:
    return module.peft_config[ADAPTER].to_dict()


class LoraTrainable(Trainable):
    def __init__(
        self, base: Any, params: LoraParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        super().__init__(base, training, device=device)
        self.params = params
        self.unet = base.unet
        self.unet.add_adapter(
            _config(params.rank, params.effective_alpha, params.dropout, unet_targets(params.targets))
        )
        self.text_encoder_trains = params.train_text_encoder
        self.encoder_names: list[str] = []
        if params.train_text_encoder:
            te_rank = params.text_encoder_rank or params.rank
            # Same alpha/rank ratio as the UNet, so one scale means the same strength on both.
            te_alpha = params.effective_alpha * te_rank / params.rank
            for name in TEXT_ENCODERS:
                encoder = getattr(base, name)
                if encoder is None:
                    continue
                # peft directly: transformers' `add_adapter` demands a newer peft than diffusers does,
                # and the injected layers are the same ones `load_lora_weights` creates at inference.
                inject_adapter_in_model(
                    _config(te_rank, te_alpha, params.dropout, TEXT_ENCODER), encoder, adapter_name=ADAPTER
                )
                self.add_module(name, encoder)
                self.encoder_names.append(name)

    def save(self, out_dir: Path) -> list[str]:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline_cls = StableDiffusionXLPipeline if self.base.family == "sdxl" else StableDiffusionPipeline
        layers: dict[str, Any] = {
            "unet_lora_layers": _lora_state(self.unet),
            "unet_lora_adapter_metadata": _metadata(self.unet),
        }
        for name in self.encoder_names:
            encoder = getattr(self, name)
            layers[f"{name}_lora_layers"] = _lora_state(encoder)
            layers[f"{name}_lora_adapter_metadata"] = _metadata(encoder)
        out_dir.mkdir(parents=True, exist_ok=True)
        pipeline_cls.save_lora_weights(out_dir, weight_name=WEIGHT_NAME, **layers)
        return [WEIGHT_NAME]


class LoraMethod:
    name: ClassVar[str] = "lora"
    Params: ClassVar[type[LoraParams]] = LoraParams
    dataset_kind: ClassVar[str] = "captioned_images"
    artifact_format: ClassVar[str] = "diffusers"

    def build(
        self, base: Any, params: LoraParams, training: TrainingParams, *, device: torch.device
    ) -> LoraTrainable:
        return LoraTrainable(base, params, training, device=device)

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        """Load the LoRA as `use.adapter_name` at `use.scale`, beside adapters loaded before it."""
        pipe, name = ctx.pipe, use.adapter_name
        pipe.load_lora_weights(str(artifact_dir), weight_name=WEIGHT_NAME, adapter_name=name)
        # Deleting the last adapter leaves peft's wrappers computing exactly the base layer.
        ctx.undo.append(lambda: pipe.delete_adapters([name]))
        set_adapter_scale(pipe, name, use.scale)


def set_adapter_scale(pipe: Any, adapter_name: str, scale: float) -> None:
    """Activate `adapter_name` at `scale` beside the adapters already active.

    `pipe.set_adapters` replaces the whole active set, so composing artifacts one `apply` at a time
    would need every earlier weight again; peft's per-layer `set_scale` touches only this adapter.
    """
    active = list(dict.fromkeys([*pipe.get_active_adapters(), adapter_name]))
    for name in ("unet", *TEXT_ENCODERS):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        for module in component.modules():
            if adapter_name in getattr(module, "scaling", {}) and hasattr(module, "set_adapter"):
                module.set_adapter(active, inference_mode=True)
                module.set_scale(adapter_name, scale)
