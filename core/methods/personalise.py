"""Personalisation: a `lora` job whose adapters start from a hyper_lora's prediction (`init_from`).

The prediction is computed once per attempt, before the LoRA is built: the reference images go
through the image encoder the hyper_lora was trained with (the base's), their tokens are averaged
(one LoRA for the concept, whatever the number of references) and the network's factors become the
LoRA's initial `lora_A` / `lora_B` weights. The loop then trains `max_steps` ordinary LoRA steps
from there (0: the prediction alone), so the artifact, its exports and its use in generations are
those of any LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from core.errors import MethodInputError, NonFiniteError
from core.methods.hyper_lora import ReferenceEncoder, load_network
from core.methods.lora import ADAPTER

UNET = "unet"  # LoraTrainable registers the UNet under this attribute name


@dataclass(frozen=True)
class Prediction:
    state: dict[str, torch.Tensor]  # LoraTrainable trainable-state names -> initial weights
    instance_prompt: str  # what the hyper_lora trained captions to: the fine-tune's default caption


@torch.no_grad()
def predict_lora(
    *, artifact_dir: Path, image_encoder_path: Path | None, images: list[Image.Image], device: torch.device
) -> Prediction:
    """The hyper_lora's LoRA for `images`, keyed as a `lora` job's trainable state. A prediction
    with NaN or infinite values (from a hyper_lora stored before the job layer refused non-finite
    weights) raises NonFiniteError "non_finite_prediction": it would train and
    generate noise."""
    if not 1 <= len(images) <= 5:
        raise MethodInputError("invalid_init_from", f"1 to 5 reference images are needed, not {len(images)}")
    network, trained_encoder = load_network(artifact_dir)
    encoder = ReferenceEncoder(image_encoder_path)
    mismatched = [
        key
        for key, value in encoder.describe().items()
        if key != "folder" and trained_encoder.get(key) != value
    ]
    if mismatched:
        raise MethodInputError(
            "image_encoder_mismatch",
            f"the hyper_lora was trained with another image encoder ({', '.join(mismatched)} differ)",
        )
    tokens = encoder.tokens(images, device, network.config.features).mean(dim=0, keepdim=True)
    factors = network.to(device)(tokens)
    state = {}
    for layer in network.config.layers:
        a, b = factors[layer.name]
        a_shape, b_shape = layer.peft_shapes(network.config.rank)
        prefix = f"{UNET}.{layer.name}"
        state[f"{prefix}.lora_A.{ADAPTER}.weight"] = a[0].float().cpu().reshape(a_shape)
        state[f"{prefix}.lora_B.{ADAPTER}.weight"] = b[0].float().cpu().reshape(b_shape)
    bad = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteError(
            "non_finite_prediction",
            f"the hyper_lora's prediction for these reference images holds NaN or infinite values in "
            f"{len(bad)} of {len(state)} LoRA weights (first: {bad[0]}): its artifact is unusable; "
            "train the hyper_lora again",
        )
    return Prediction(state, network.config.instance_prompt)
