"""The memory planner (core/training/memory.py): exact parameter counts (param_counts.py) against
diffusers' and transformers' own classes, the shape of its estimates, and `fit: "auto"`'s changes. Its
activation constants are checked against measured real-size steps in tests/test_realsize.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.bases.architectures import KNOWN, Architecture
from core.spec.job import JobSpec
from core.training import memory, param_counts

GIB = 1024**3
REAL = ("sd15", "sd21", "sdxl")


def _models(arch: Architecture) -> dict[str, Any]:
    from bench.sized_bases import _components

    return _components(arch)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", [*REAL, "tiny-sd", "tiny-sdxl"])
def test_parameter_counts_are_exact(name: str) -> None:
    """Every component's count from its config equals the count of the real class built on the
    meta device: SD1.5's UNet is 859,520,964 parameters, SDXL's 2,567,463,684."""
    from diffusers import ControlNetModel

    arch = KNOWN[name]
    models = _models(arch)
    assert param_counts.unet_params(arch.unet).total == _count(models["unet"])
    assert param_counts.vae_params(arch.vae).total == _count(models["vae"])
    for i, config in enumerate(arch.text_encoders):
        encoder = models[("text_encoder", "text_encoder_2")[i]]
        assert param_counts.text_encoder_params(config, projection=i == 1).total == _count(encoder)
    assert param_counts.image_encoder_params(arch.image_encoder).total == _count(models["image_encoder"])
    embedding = [16, 32, 96, 256][: len(arch.vae["block_out_channels"])]
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(models["unet"], conditioning_embedding_out_channels=embedding)
    assert param_counts.controlnet_params(arch.unet, embedding).total == _count(controlnet)
    if name == "sd15":
        assert param_counts.unet_params(arch.unet).total == 859_520_964
    if name == "sdxl":
        assert param_counts.unet_params(arch.unet).total == 2_567_463_684


@pytest.mark.parametrize("name", REAL)
def test_adapter_parameter_counts_are_exact(name: str) -> None:
    """LoRA (both target sets) against peft, the hypernetwork against the method's own module."""
    from peft import LoraConfig

    from core.methods.hypernetwork import Hypernetwork
    from core.methods.lora import unet_targets
    from core.spec.methods import HypernetworkParams

    arch = KNOWN[name]
    for targets in ("attention", "attention+conv+ff"):
        unet = _models(arch)["unet"]
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=unet_targets(targets)))
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        assert param_counts.lora_params(arch.unet, 8, targets != "attention").total == lora
    params = HypernetworkParams(layer_structure=[1, 2, 1], layer_norm=True)
    with torch.device("meta"):
        network = Hypernetwork(params, [arch.unet["cross_attention_dim"]])
    assert param_counts.hypernetwork_params(arch.unet, [1, 2, 1], True).total == _count(network)


def _spec(method: str, **training: Any) -> JobSpec:
    params: dict[str, Any] = {
        "lora": {"method": "lora"},
        "dreambooth": {"method": "dreambooth", "instance_prompt": "a sks dog", "class_prompt": "a dog"},
        "textual_inversion": {
            "method": "textual_inversion",
            "placeholder_token": "<t>",
            "initializer_token": "a",
        },
    }[method]
    return JobSpec(base_model="b", dataset_id="d", params=params, training=training)


def test_estimates_move_the_way_memory_does() -> None:
    sdxl, sd15 = KNOWN["sdxl"], KNOWN["sd15"]
    lora = memory.estimate(_spec("lora", resolution=1024, batch_size=4), sdxl)
    assert memory.estimate(_spec("lora", resolution=1024, batch_size=8), sdxl).peak_bytes > lora.peak_bytes
    checkpointed = memory.estimate(
        _spec("lora", resolution=1024, batch_size=4, gradient_checkpointing=True), sdxl
    )
    assert checkpointed.parts["activations"] < lora.parts["activations"] / 3
    assert memory.estimate(_spec("lora", resolution=512, batch_size=4), sd15).peak_bytes < lora.peak_bytes
    # Full fine-tunes: AdamW holds two fp32 moments per weight; 8-bit and factored state far less.
    adam = memory.estimate(_spec("dreambooth", resolution=512), sd15).parts["optimizer_state"]
    assert adam == 8 * param_counts.unet_params(sd15.unet).total
    for optimizer in ("adamw_8bit", "adafactor"):
        assert (
            memory.estimate(_spec("dreambooth", resolution=512, optimizer=optimizer), sd15).parts[
                "optimizer_state"
            ]
            < adam / 3
        )
    # fp32 training keeps frozen weights in fp32: twice bf16's bytes.
    fp32 = memory.estimate(_spec("lora", mixed_precision="no"), sdxl).parts["weights"]
    bf16 = memory.estimate(_spec("lora"), sdxl).parts["weights"]
    vae = param_counts.vae_params(sdxl.vae).total * 4  # fp32 either way
    assert fp32 - vae == 2 * (bf16 - vae)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_runs_only_where_the_cpu_has_it(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 asked of a CPU worker: autocast on hosts with native bf16, fp32 on AVX2 hosts (emulated
    bf16 runs 100-250x slower there); the planner counts the weights in the dtype the worker uses."""
    import core.cpu_features
    from core.training.optim import resolve_precision

    monkeypatch.setattr(core.cpu_features, "cpu_has_native_bf16", lambda: native)
    precision = resolve_precision("bf16", torch.device("cpu"))
    expected = torch.bfloat16 if native else torch.float32
    assert precision.weight_dtype == expected
    assert precision.autocast_dtype == (torch.bfloat16 if native else None)
    sdxl = KNOWN["sdxl"]
    planned = memory.estimate(_spec("lora", mixed_precision="bf16"), sdxl, device="cpu")
    fp32 = memory.estimate(_spec("lora", mixed_precision="no"), sdxl, device="cpu")
    assert (planned.parts["weights"] < fp32.parts["weights"]) is native
    # A GPU worker's bf16 does not depend on the planner's CPU.
    on_gpu = memory.estimate(_spec("lora", mixed_precision="bf16"), sdxl, device="cuda")
    assert on_gpu.parts["weights"] < fp32.parts["weights"]


def test_small_datasets_are_encoded_in_smaller_chunks() -> None:
    spec = _spec("lora", resolution=512)
    one = memory.estimate(spec, KNOWN["sd15"], images=1).parts["vae_encoding"]
    assert memory.estimate(spec, KNOWN["sd15"], images=100).parts["vae_encoding"] == 2 * one
    assert memory.encode_chunk(1024 * 1024) == 1 and memory.encode_chunk(64 * 64) == 8


def test_fit_auto_changes_the_job_in_order_until_it_fits() -> None:
    """SDXL DreamBooth at 1024 px, batch 8, AdamW: far over 24 GiB; auto turns on checkpointing,
    factored optimizer state, then micro-batches with accumulation at the same effective batch."""
    spec = _spec("dreambooth", resolution=1024, batch_size=8)
    plain = memory.plan_fit(spec, KNOWN["sdxl"], 24 * GIB, auto=False)
    assert not plain.fits and plain.changes == [] and plain.estimate.peak_bytes > 24 * GIB
    fitted = memory.plan_fit(spec, KNOWN["sdxl"], 24 * GIB, auto=True)
    assert fitted.fits, fitted.to_public()
    fields = [change.field for change in fitted.changes]
    assert fields[:2] == ["training.gradient_checkpointing", "training.optimizer"]
    training = fitted.spec.training
    assert training.gradient_checkpointing and training.optimizer == "adafactor"
    assert training.batch_size * training.gradient_accumulation_steps == 8
    assert fitted.estimate.peak_bytes + memory.RESERVE_BYTES <= 24 * GIB
    peaks = [change.peak_bytes_after for change in fitted.changes]
    assert peaks == sorted(peaks, reverse=True)  # every change helped
    # Where workers have bitsandbytes, 8-bit AdamW is preferred to Adafactor.
    eight_bit = memory.plan_fit(
        spec, KNOWN["sdxl"], 40 * GIB, auto=True, optimizers=frozenset({"adamw", "adamw_8bit", "adafactor"})
    )
    assert eight_bit.spec.training.optimizer == "adamw_8bit"


def test_a_job_that_fits_is_left_alone() -> None:
    spec = _spec("lora", resolution=512, batch_size=4)
    plan = memory.plan_fit(spec, KNOWN["sd15"], 24 * GIB, auto=True)
    assert plan.fits and plan.changes == [] and plan.spec == spec


def test_nothing_fits_a_tiny_card() -> None:
    plan = memory.plan_fit(_spec("dreambooth", resolution=1024), KNOWN["sdxl"], 8 * GIB, auto=True)
    assert not plan.fits and plan.changes  # it tried, and says what it tried
