"""kohya key names of an SDXL LoRA at the real SDXL UNet's size, built on the meta device (shapes
only, no weights: seconds and a few MB).

The expected names are written out from kohya-ss/sd-scripts `library/sdxl_original_unet.py`, the
UNet kohya trains SDXL LoRAs on: where its transformers sit and how deep they are, which resnets
change channels (and so have a `skip_connection` conv). diffusers' own kohya loader must turn the
exported names back into exactly the PEFT modules we trained.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from core.bases.architectures import SDXL_UNET
from core.exports.lora import kohya_tensors
from core.methods.lora import unet_targets

RANK, ALPHA = 4, 2.0
# SdxlUNet2DConditionModel: each Transformer2DModel's block path and depth (transformer_blocks).
TRANSFORMERS = {
    "input_blocks_4_1": 2,
    "input_blocks_5_1": 2,
    "input_blocks_7_1": 10,
    "input_blocks_8_1": 10,
    "middle_block_1": 10,
    **{f"output_blocks_{i}_1": 10 for i in range(3)},
    **{f"output_blocks_{i}_1": 2 for i in range(3, 6)},
}
RESNETS = [f"input_blocks_{i}_0" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block_0", "middle_block_2"]
RESNETS += [f"output_blocks_{i}_0" for i in range(9)]
# The resnets whose input and output widths differ: the first of levels 1 and 2, and every output
# resnet (it takes the skip connection concatenated to its input).
SKIPS = ["input_blocks_4_0", "input_blocks_7_0"] + [f"output_blocks_{i}_0" for i in range(9)]


def attention_names() -> set[str]:
    return {
        f"lora_unet_{block}_transformer_blocks_{layer}_{attn}_{proj}"
        for block, depth in TRANSFORMERS.items()
        for layer in range(depth)
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    }


def conv_ff_names() -> set[str]:
    transformers = {f"lora_unet_{b}_{p}" for b in TRANSFORMERS for p in ("proj_in", "proj_out")}
    ff = {
        f"lora_unet_{block}_transformer_blocks_{layer}_ff_{proj}"
        for block, depth in TRANSFORMERS.items()
        for layer in range(depth)
        for proj in ("net_0_proj", "net_2")
    }
    resnets = {f"lora_unet_{r}_{conv}" for r in RESNETS for conv in ("in_layers_2", "out_layers_3")}
    return transformers | ff | resnets | {f"lora_unet_{r}_skip_connection" for r in SKIPS}


def sdxl_lora(targets: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The `unet.` PEFT state of an SDXL-size UNet with LoRA on `targets`, as core/methods/lora.py
    adds it, and the UNet's config. Meta tensors: only names and shapes exist."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=unet_targets(targets)))
    state = {f"unet.{key}": tensor for key, tensor in get_peft_model_state_dict(unet).items()}
    return state, unet.config


@pytest.fixture(scope="module", params=["attention", "attention+conv+ff"])
def exported(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], Any]:
    state, config = sdxl_lora(request.param)
    tensors = kohya_tensors(state, {"unet": (RANK, ALPHA)}, "sdxl", unet_config=dict(config))
    return request.param, state, tensors, config


def modules_of(tensors: dict[str, Any]) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


def test_sdxl_unet_names_are_kohyas(exported: Any) -> None:
    targets, state, tensors, _ = exported
    modules = modules_of(tensors)
    expected = attention_names() | (conv_ff_names() if targets == "attention+conv+ff" else set())
    # 70 transformer blocks x 2 attentions x 4 projections; conv+ff adds 22 proj_in/out, 140 ff,
    # 34 resnet convs and 11 skip connections.
    assert len(expected) == (560 if targets == "attention" else 767)
    assert modules == expected
    assert len(tensors) == 3 * len(modules) == 3 * len(state) // 2
    assert all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for m in modules
    )
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v",
    ):
        assert f"{name}.lora_down.weight" in tensors and tensors[f"{name}.alpha"].item() == ALPHA
    # Shapes travel unchanged: a 1280-wide attention at level 2, convs kept 4-D.
    shapes = {key.removesuffix(".weight"): tuple(t.shape) for key, t in tensors.items()}
    assert shapes["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down"] == (RANK, 1280)
    if targets == "attention+conv+ff":
        assert shapes["lora_unet_input_blocks_1_0_in_layers_2.lora_down"] == (RANK, 320, 3, 3)
        assert shapes["lora_unet_output_blocks_8_0_skip_connection.lora_up"] == (320, RANK, 1, 1)


def test_diffusers_reads_the_sdxl_names_back_as_our_modules(exported: Any) -> None:
    _, state, tensors, config = exported
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(tensors), unet_config=config)
    assert all(key.startswith("unet.") for key in converted)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert set(peft) == {key.removeprefix("unet.") for key in state}
    assert all(peft[key.removeprefix("unet.")].shape == t.shape for key, t in state.items())
    assert len(alphas) == len(state) // 2 and set(alphas.values()) == {ALPHA}


def test_a_module_without_a_stability_name_is_refused() -> None:
    state, config = sdxl_lora("attention")
    alphas = {"unet": (RANK, ALPHA)}
    with pytest.raises(ValueError, match="no original-layout name"):
        kohya_tensors(
            {**state, "unet.encoder_hid_proj.lora_A.weight": torch.zeros(RANK, 8)},
            alphas,
            "sdxl",
            unet_config=dict(config),
        )
    with pytest.raises(ValueError, match="no UNet config"):
        kohya_tensors(state, alphas, "sdxl")
    # A config whose mid block has no Stability counterpart leaves its modules unnamed.
    other_mid = {**config, "mid_block_type": "UNetMidBlock2D"}
    with pytest.raises(ValueError, match="no original-layout name"):
        kohya_tensors(state, alphas, "sdxl", unet_config=other_mid)
