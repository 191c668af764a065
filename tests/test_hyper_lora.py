"""hyper_lora: the dataset and request checks, the exact parameter count the planner uses, training
and resuming on the shared loop, and that a prediction copied into an ordinary LoRA computes
exactly what the network's functional LoRA computed. The held-out results are in
tests/test_hyper_lora_held_out.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from core.bases.architectures import KNOWN
from core.errors import MethodInputError
from core.jobs.artifact import train_artifact
from core.methods import get_method
from core.methods.hyper_lora import WEIGHT_NAME, HyperLoraConfig, HyperLoraNetwork, lora_layout
from core.methods.init_from import check_compatible
from core.methods.lora import ADAPTER, LoraMethod
from core.methods.personalise import UNET, predict_lora
from core.spec.job import JobSpec
from core.spec.methods import HyperLoraParams, LoraParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from core.training import memory
from core.training.caching import Batch
from core.training.progress import NullHooks
from tests import hyper_lora_world as world
from tests import test_training_loop as shared

CPU = torch.device("cpu")
one_thread, tiny_cache, load_tiny = shared.one_thread, shared.tiny_cache, shared.load_tiny
StopAfterCheckpoint, ResumeFrom = shared.StopAfterCheckpoint, shared.ResumeFrom


def report(names: list[str]) -> dict[str, Any]:
    return {"accepted": [{"name": name} for name in names]}


def test_dataset_needs_enough_concept_folders_with_enough_images() -> None:
    params = HyperLoraParams()
    good = [f"c{c}/{i}.png" for c in range(4) for i in range(2)]
    assert params.dataset_problems(report(good)) == []
    # A zip that wraps everything in one folder is fine too: the concept is the innermost folder.
    assert params.dataset_problems(report([f"upload/{n}" for n in good])) == []
    problems = params.dataset_problems(report([*good[:6], "c3/0.png", "loose.png"]))
    assert len(problems) == 2, problems
    assert "1 image(s) are not in a concept folder" in problems[0]
    assert "c3" in problems[1] and "fewer than 2" in problems[1]
    problems = params.dataset_problems(report(good[:6]))
    assert problems == ["3 concept folder(s); at least 4 are needed"]


def test_init_from_is_for_lora_jobs_with_one_to_five_images() -> None:
    init = {"hyper_lora": "art_01ab", "images": ["img_01"]}
    spec = JobSpec(base_model="b", params={"method": "lora"}, training={"max_steps": 0}, init_from=init)
    assert spec.dataset_id is None and spec.training.max_steps == 0
    bad = [
        ({"params": {"method": "hyper_lora"}, "init_from": init}, "lora jobs only"),
        ({"params": {"method": "lora"}}, "dataset_id is required"),
        ({"params": {"method": "lora"}, "dataset_id": "d", "training": {"max_steps": 0}}, "at least 1"),
        ({"params": {"method": "lora"}, "init_from": {**init, "images": []}}, "at least 1 item"),
        ({"params": {"method": "lora"}, "init_from": {**init, "images": ["img_1"] * 6}}, "at most 5"),
        ({"params": {"method": "lora"}, "init_from": {**init, "hyper_lora": "ds_1"}}, "pattern"),
    ]
    for body, message in bad:
        with pytest.raises(ValidationError, match=message):
            JobSpec(base_model="b", **body)


def test_a_lora_must_have_the_layout_the_hyper_lora_predicts() -> None:
    manifest = {
        "method": "hyper_lora",
        "base_model": "tiny-sd",
        "params": {"rank": 4, "alpha": None, "targets": "attention+conv+ff"},
    }
    same = LoraParams(rank=4, targets="attention+conv+ff")
    assert check_compatible(manifest, base_model="tiny-sd", lora=same) == []
    problems = check_compatible(manifest, base_model="tiny-sdxl", lora=LoraParams(rank=8, alpha=8))
    assert [p.split()[0] for p in problems] == ["the", "params.rank", "params.alpha", "params.targets"]
    assert check_compatible({**manifest, "method": "lora"}, base_model="tiny-sd", lora=same) == [
        "the artifact is a lora artifact, not a hyper_lora"
    ]


@pytest.mark.parametrize("name", ["sd15", "tiny-sd"])
def test_planner_counts_the_network_exactly(name: str) -> None:
    from tests.test_memory_planner import _models

    arch = KNOWN[name]
    unet = _models(arch)["unet"]
    # Each token is the patch embedding beside the last hidden state: twice the encoder's width.
    token_dim = 2 * arch.image_encoder["hidden_size"]
    for targets in ("attention", "attention+conv+ff"):
        params = HyperLoraParams(targets=targets, rank=2, basis_size=4, hidden_dim=64)
        config = HyperLoraConfig(token_dim, 64, 4, 2, 2.0, "p", lora_layout(unet, targets))
        with torch.device("meta"):
            network = HyperLoraNetwork(config)
        expected = sum(p.numel() for p in network.parameters())
        spec = JobSpec(base_model=name, dataset_id="ds", params=params.model_dump())
        assert memory.trained_params(spec, arch).total == expected, targets


def test_missing_image_encoder_fails_the_job(tiny_cache: Path) -> None:
    import dataclasses

    base = dataclasses.replace(load_tiny(tiny_cache, "tiny-sd"), image_encoder_path=None)
    with pytest.raises(MethodInputError) as raised:
        get_method("hyper_lora").build(base, HyperLoraParams(), TrainingParams(), device=CPU)
    assert raised.value.code == "image_encoder_missing"


def small_spec(steps: int, **training: Any) -> JobSpec:
    return JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "hyper_lora", "targets": "attention+conv+ff", "hidden_dim": 32, "basis_size": 4},
        training={"max_steps": steps, "learning_rate": 1e-3, "batch_size": 4, "seed": 3, **training},
    )


def small_dataset() -> list[world.Item]:
    return world.concept_dataset(seed=0)[: 4 * world.IMAGES_PER_CONCEPT]


def test_dataset_without_concept_folders_fails_the_job(tiny_cache: Path, tmp_path: Path) -> None:
    items = [world.Item(item.image, None, f"{i}.png") for i, item in enumerate(small_dataset())]
    base = load_tiny(tiny_cache, "tiny-sd")
    with pytest.raises(MethodInputError) as raised:
        train_artifact(
            spec=small_spec(1), base=base, items=items, workdir=tmp_path, hooks=NullHooks(), device=CPU
        )
    assert raised.value.code == "dataset_unsuitable" and "12 top-level images" in str(raised.value)


def test_trains_resumes_and_records_what_it_predicts_for(tiny_cache: Path, tmp_path: Path) -> None:
    """A run stopped at its step-2 checkpoint and resumed ends with the very network an
    uninterrupted run trains; the artifact names the base, the layout and the image encoder."""
    items = small_dataset()
    full = train_artifact(
        spec=small_spec(4, checkpoint_every=2),
        base=load_tiny(tiny_cache, "tiny-sd"),
        items=items,
        workdir=tmp_path / "full",
        hooks=NullHooks(),
        device=CPU,
    )
    stopper = StopAfterCheckpoint(tmp_path / "kept")
    with pytest.raises(shared.StopTraining):
        train_artifact(
            spec=small_spec(4, checkpoint_every=2),
            base=load_tiny(tiny_cache, "tiny-sd"),
            items=items,
            workdir=tmp_path / "stopped",
            hooks=stopper,
            device=CPU,
        )
    assert stopper.saved is not None
    resumed = train_artifact(
        spec=small_spec(4, checkpoint_every=2),
        base=load_tiny(tiny_cache, "tiny-sd"),
        items=items,
        workdir=tmp_path / "resumed",
        hooks=ResumeFrom(stopper.saved),
        device=CPU,
    )
    assert resumed.resumed_from_step == 2
    expected, actual = (
        load_file(full.artifact_dir / WEIGHT_NAME),
        load_file(resumed.artifact_dir / WEIGHT_NAME),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    # Training moved the network: the B basis starts at zero.
    assert any(actual[k].abs().sum() > 0 for k in actual if k.startswith("basis_b."))

    manifest = verify_manifest(full.artifact_dir)
    assert manifest["method"] == "hyper_lora" and manifest["base_model"]["id"] == "tiny-sd"
    assert (
        check_compatible(manifest, base_model="tiny-sd", lora=LoraParams(targets="attention+conv+ff")) == []
    )
    with safe_open(full.artifact_dir / WEIGHT_NAME, "pt") as handle:
        config = HyperLoraConfig.from_json(handle.metadata()["config"])
    base = load_tiny(tiny_cache, "tiny-sd")
    assert config.layers == lora_layout(base.unet, "attention+conv+ff") and config.rank == 4
    assert any(layer.kernel == (3, 3) for layer in config.layers)
    assert config.features == ("patch_embeddings", "last_hidden_state") and config.token_dim == 64
    assert config.fan_in_scaled  # new networks train with the stable parametrisation


def test_reference_tokens_keep_the_intensity_the_encoder_normalises_away(tiny_cache: Path) -> None:
    """Each token holds the patch embedding beside the last hidden state. The patch embedding is
    linear in the (normalised) pixels, so a darker shade of a hue stays apart from the brighter one;
    the last hidden state comes after the encoder's LayerNorm, which divides much of that away."""
    from core.methods.hyper_lora import ReferenceEncoder

    encoder = ReferenceEncoder(load_tiny(tiny_cache, "tiny-sd").image_encoder_path)
    both = ("patch_embeddings", "last_hidden_state")
    images = [shared.solid((230, 30, 230)), shared.solid((115, 15, 115))]  # magenta and a darker magenta
    tokens = encoder.tokens(images, CPU, both)
    width = encoder.model.config.hidden_size
    assert tokens.shape == (2, 17, 2 * width) and encoder.token_dim(both) == 2 * width
    last = encoder.tokens(images, CPU, ("last_hidden_state",))
    torch.testing.assert_close(tokens[..., width:], last)

    def cosine(t: torch.Tensor) -> float:
        a, b = t[0, 1:].flatten(), t[1, 1:].flatten()  # the patch tokens, not the class token
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    patches, after_norm = tokens[..., :width], last
    # Measured on tiny-sd's encoder: 0.53 against 0.68.
    assert cosine(patches) < cosine(after_norm) - 0.05, (cosine(patches), cosine(after_norm))
    with pytest.raises(ValueError, match="unknown image feature"):
        encoder.tokens(images, CPU, ("pooled",))


def test_an_artifact_without_features_reads_the_last_hidden_state() -> None:
    """hyper_lora artifacts written before patch embeddings were added still load as trained."""
    layer = {
        "name": "x",
        "in_features": 2,
        "out_features": 2,
        "kernel": None,
        "stride": [1, 1],
        "padding": [0, 0],
    }
    old = {"token_dim": 32, "hidden_dim": 16, "basis_size": 2, "rank": 1, "alpha": 1.0}
    config = HyperLoraConfig.from_json(json.dumps(old | {"instance_prompt": "p", "layers": [layer]}))
    assert config.features == ("last_hidden_state",) and config.token_dim == 32
    assert HyperLoraConfig.from_json(config.to_json()) == config
    # ... and compute as they did before the pooled features were normalised and the heads scaled:
    # their stored weights are the plain ones.
    assert config.fan_in_scaled is False
    network = HyperLoraNetwork(config).eval()
    tokens = torch.randn(3, 5, 32)
    pooled = network.mixer(network.embed(network.norm(tokens))).mean(dim=1)
    coeffs = network.coefficients(pooled).view(3, 1, 2, 2)
    a, b = network(tokens)["x"]
    torch.testing.assert_close(a, torch.einsum("bk,kri->bri", coeffs[:, 0, 0], network.basis_a[0]))
    torch.testing.assert_close(b, torch.einsum("bk,kor->bor", coeffs[:, 0, 1], network.basis_b[0]))


def test_prediction_as_an_ordinary_lora_computes_what_the_network_does(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """The factors `predict_lora` copies into a `lora` job's peft adapters are the network's, and
    peft computes with them what the functional (hooked) LoRA computed in training, for linear and
    conv layers alike.

    The UNets compare in float64: three steps at lr 5e-2 predict a LoRA that drives some activations
    of the tiny UNet to 1e11, and its GroupNorms then amplify float32's rounding (different in each
    library's kernels) into differences of 1e-4 at the output. Measured on an Intel Xeon (AVX-512):
    3.3e-4 in float32, which failed a 1e-5 tolerance that had passed on an AMD EPYC (AVX2)."""
    items = small_dataset()
    hyper = train_artifact(
        spec=small_spec(3, learning_rate=5e-2),
        base=load_tiny(tiny_cache, "tiny-sd"),
        items=items,
        workdir=tmp_path / "hyper",
        hooks=NullHooks(),
        device=CPU,
    )
    base = load_tiny(tiny_cache, "tiny-sd")
    refs = [items[0].image, items[1].image]
    prediction = predict_lora(
        artifact_dir=hyper.artifact_dir, image_encoder_path=base.image_encoder_path, images=refs, device=CPU
    )
    assert prediction.instance_prompt == "a photo of sks"

    trainable = get_method("hyper_lora").build(base, small_spec(1).params, TrainingParams(), device=CPU)
    trainable.network.load_state_dict(load_file(hyper.artifact_dir / WEIGHT_NAME))
    tokens = trainable.encoder.tokens(refs, CPU, trainable.config.features).mean(dim=0, keepdim=True)
    with torch.no_grad():
        factors = trainable.network(tokens)
    # The copy: each predicted factor, in peft's key and shape (one network pass against another).
    copied = {}
    for layer in trainable.config.layers:
        a_shape, b_shape = layer.peft_shapes(trainable.config.rank)
        a = prediction.state[f"{UNET}.{layer.name}.lora_A.{ADAPTER}.weight"]
        b = prediction.state[f"{UNET}.{layer.name}.lora_B.{ADAPTER}.weight"]
        assert (a.shape, b.shape) == (a_shape, b_shape), layer.name
        net_a, net_b = factors[layer.name]
        torch.testing.assert_close(a.reshape(net_a.shape), net_a)
        torch.testing.assert_close(b.reshape(net_b.shape), net_b)
        copied[layer.name] = (a.reshape(net_a.shape).double(), b.reshape(net_b.shape).double())

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    context = torch.randn(2, 77, 32, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([10, 700])
    base.unet.double()
    with torch.no_grad():
        plain = base.unet(latents, timesteps, encoder_hidden_states=context).sample
        with trainable.lora.applied(copied):
            hooked = base.unet(latents, timesteps, encoder_hidden_states=context).sample
    trainable.lora.remove()

    lora_base = load_tiny(tiny_cache, "tiny-sd")
    lora_params = LoraParams(rank=4, targets="attention+conv+ff")
    lora = LoraMethod().build(lora_base, lora_params, TrainingParams(), device=CPU)
    lora.load_initial_state(prediction.state)
    lora_base.unet.double()
    with torch.no_grad():
        loaded = lora_base.unet(latents, timesteps, encoder_hidden_states=context).sample
    assert (hooked - plain).abs().mean() > 1e-3  # the prediction is not "no change"
    torch.testing.assert_close(loaded, hooked, rtol=1e-7, atol=1e-9)


def test_initial_state_of_another_layout_is_refused(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    lora = LoraMethod().build(base, LoraParams(rank=2), TrainingParams(), device=CPU)
    name = next(n for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(MethodInputError) as raised:
        lora.load_initial_state({name: torch.zeros(7, 7)})
    assert raised.value.code == "init_mismatch"


def test_functional_lora_gives_each_sample_its_own_lora(tiny_cache: Path) -> None:
    """In a batch of two concepts each sample's output is what it gets alone."""
    base = load_tiny(tiny_cache, "tiny-sd")
    trainable = get_method("hyper_lora").build(base, small_spec(1).params, TrainingParams(), device=CPU)
    with torch.no_grad():
        for basis in trainable.network.basis_b:
            basis.normal_(std=0.5)
    images = [Image.fromarray(np.full((32, 32, 3), c, dtype=np.uint8)) for c in ((250, 0, 250), (0, 200, 0))]
    features = trainable.image_features(images)
    generator = torch.Generator().manual_seed(1)
    batch = Batch(
        latents=torch.randn(2, 4, 16, 16, generator=generator),
        noise=torch.randn(2, 4, 16, 16, generator=generator),
        timesteps=torch.tensor([100, 100]),
        encoder_hidden_states=torch.randn(1, 77, 32, generator=generator).expand(2, -1, -1),
        image_features=features,
    )
    with torch.no_grad():
        factors = trainable.network(features)
        with trainable.lora.applied(factors):
            both = base.unet(
                batch.latents, batch.timesteps, encoder_hidden_states=batch.encoder_hidden_states
            )
        for i in range(2):
            alone = {name: (a[i : i + 1], b[i : i + 1]) for name, (a, b) in factors.items()}
            with trainable.lora.applied(alone):
                one = base.unet(
                    batch.latents[i : i + 1],
                    batch.timesteps[i : i + 1],
                    batch.encoder_hidden_states[i : i + 1],
                )
            torch.testing.assert_close(both.sample[i : i + 1], one.sample, rtol=1e-4, atol=1e-5)
        assert (both.sample[0] - both.sample[1]).abs().mean() > 0
    loss = trainable(batch)
    loss.backward()
    assert trainable.network.coefficients.weight.grad is not None  # gradients reach the network
