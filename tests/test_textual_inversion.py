"""Textual Inversion: only the new token rows train, the artifact loads with diffusers' own
`load_textual_inversion` into a fresh pipeline and computes what the trained model computes, `apply`
is undone exactly, and (slow) the token learns a colour on the pre-trained tiny bases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from core.bases.tiny.world import Scene, render
from core.errors import MethodInputError
from core.jobs.artifact import TrainedArtifact, train_artifact
from core.methods import get_method
from core.methods.base import SAMPLE_STEPS
from core.methods.context import ArtifactUse, GenerationContext, applied
from core.methods.textual_inversion import (
    TEMPLATES,
    WEIGHT_NAME,
    ExtendedEmbedding,
    TextualInversionMethod,
)
from core.spec.job import JobSpec
from core.spec.methods import TextualInversionParams
from core.spec.training import TrainingParams
from core.training.caching import Batch, tokenize
from core.training.progress import NullHooks
from tests import test_training_loop as shared

CPU = torch.device("cpu")
TOKEN = "<x>"
ENCODERS = {"tiny-sd": ("text_encoder",), "tiny-sdxl": ("text_encoder", "text_encoder_2")}
# Shared with the training-loop tests; pytest finds fixtures by module attribute.
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
Item, load_tiny = shared.Item, shared.load_tiny


def colour_items(n: int, colour: str = "blue", seed: int = 0) -> list[Any]:
    """Solid images of one palette colour (with the world's jitter); their captions must be ignored."""
    rng = np.random.default_rng(seed)
    scene = Scene(None, colour, colour, 0.5, 0.5, 0.0)
    return [Item(Image.fromarray(render(scene, 32, rng)), "a caption TI ignores") for _ in range(n)]


def train_ti(
    cache: Path,
    model_id: str,
    workdir: Path,
    *,
    steps: int,
    lr: float,
    batch_size: int = 2,
    images: int = 4,
    hooks: NullHooks | None = None,
    training: dict[str, Any] | None = None,
    **params: Any,
) -> tuple[Any, TrainedArtifact]:
    """Train through the real loop (a JobSpec, `train`) from a freshly loaded base."""
    base = load_tiny(cache, model_id)
    spec = JobSpec(
        base_model=model_id,
        dataset_id="ds",
        params={
            "method": "textual_inversion",
            "placeholder_token": TOKEN,
            "initializer_token": "thing",
            **params,
        },
        training={
            "max_steps": steps,
            "learning_rate": lr,
            "batch_size": batch_size,
            "seed": 0,
            **(training or {}),
        },
    )
    hooks = hooks or NullHooks()
    result = train_artifact(
        spec=spec, base=base, items=colour_items(images), workdir=workdir, hooks=hooks, device=CPU
    )
    return base, result


class SampleHooks(NullHooks):
    def __init__(self) -> None:
        super().__init__()
        self.samples: list[Image.Image] = []

    def save_samples(self, *, step: int, images: list[Any], prompts: list[str]) -> None:
        self.samples += images


def token_ids(tokenizers: list[Any], prompt: str) -> list[list[int]]:
    return [tokenizer(prompt).input_ids for tokenizer in tokenizers]


def fresh_pipeline(base: Any) -> Any:
    cls = StableDiffusionXLPipeline if base.family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(base.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompt: str = f"a photo of a {TOKEN}", steps: int = 3) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent").images


def manifest_of(result: TrainedArtifact) -> dict[str, Any]:
    return json.loads((result.artifact_dir / "manifest.json").read_text())


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl"])
def trained(
    request: pytest.FixtureRequest, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Two steps, two vectors, through the real loop (with text-encoder checkpointing and a sample
    at the end): (model id, trained base, result, the sample)."""
    model_id, hooks = request.param, SampleHooks()
    base, result = train_ti(
        tiny_cache,
        model_id,
        tmp_path_factory.mktemp(model_id),
        steps=2,
        lr=5e-2,
        num_vectors=2,
        hooks=hooks,
        training={"gradient_checkpointing": True, "sample_prompts": [f"a photo of a {TOKEN}"]},
    )
    return model_id, base, result, hooks.samples


# --- units -------------------------------------------------------------------------------------


def test_registry_maps_the_method() -> None:
    assert isinstance(get_method("textual_inversion"), TextualInversionMethod)


def test_extended_embedding_reads_old_ids_from_the_frozen_matrix_and_trains_only_new_rows() -> None:
    original = torch.nn.Embedding(10, 4).requires_grad_(False)
    kept = original.weight.clone()
    lookup = ExtendedEmbedding(original, torch.randn(2, 4))
    ids = torch.tensor([[1, 10, 11, 3, 11]])
    out = lookup(ids)
    assert torch.equal(out[0, 0], original.weight[1]) and torch.equal(out[0, 3], original.weight[3])
    assert torch.equal(out[0, 1], lookup.new[0]) and torch.equal(out[0, 2], lookup.new[1])
    out.sum().backward()
    # Row 1 is used twice, row 0 once; the frozen matrix gets no gradient at all.
    assert torch.equal(lookup.new.grad, torch.tensor([[1.0] * 4, [2.0] * 4]))
    assert original.weight.grad is None and torch.equal(original.weight, kept)
    assert torch.equal(lookup.weight, torch.cat([kept, lookup.new.detach()]))


def test_extended_embedding_under_mixed_precision_keeps_fp32_rows() -> None:
    # What the loop does on CUDA: frozen weights in bf16, the trainable rows in fp32.
    original = torch.nn.Embedding(10, 4).to(torch.bfloat16).requires_grad_(False)
    lookup = ExtendedEmbedding(original, torch.randn(1, 4))
    out = lookup(torch.tensor([[2, 10]]))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lookup.new.dtype == lookup.new.grad.dtype == torch.float32
    assert torch.equal(lookup.new.grad, torch.ones(1, 4))


def test_templates_replace_dataset_captions_and_name_every_vector(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    params = TextualInversionParams(placeholder_token=TOKEN, initializer_token="thing", num_vectors=3)
    trainable = TextualInversionMethod().build(base, params, TrainingParams(), device=CPU)
    training_set = trainable.training_items(colour_items(2), resolution=32, hooks=NullHooks())
    words = "<x> <x>_1 <x>_2"
    assert len(TEMPLATES["object"]) >= 10 and len(TEMPLATES["style"]) >= 10
    assert all(
        item.captions == tuple(t.format(words) for t in TEMPLATES["object"]) for item in training_set.items
    )
    style = TextualInversionParams(**{**params.model_dump(), "learnable_property": "style"})
    base = load_tiny(tiny_cache, "tiny-sd")
    styled = TextualInversionMethod().build(base, style, TrainingParams(), device=CPU)
    items = styled.training_items(colour_items(1), resolution=32, hooks=NullHooks()).items
    assert items[0].captions == tuple(t.format(words) for t in TEMPLATES["style"])


def test_a_hand_built_batch_gives_gradients_only_to_the_new_rows(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sdxl")
    for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        module.requires_grad_(False)  # what the loop does before `build`
    params = TextualInversionParams(placeholder_token=TOKEN, initializer_token="thing", num_vectors=2)
    trainable = TextualInversionMethod().build(base, params, TrainingParams(), device=CPU)
    assert trainable.text_encoder_trains
    ids, ids_2 = tokenize(base, ["a photo of a <x> <x>_1", "a small <x> <x>_1"])
    assert (ids == 514).sum() == 2 and (ids_2 == 515).sum() == 2
    generator = torch.Generator().manual_seed(0)
    batch = Batch(
        latents=torch.randn(2, 4, 16, 16, generator=generator),
        noise=torch.randn(2, 4, 16, 16, generator=generator),
        timesteps=torch.tensor([100, 700]),
        input_ids=ids,
        input_ids_2=ids_2,
        time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    )
    trainable(batch).backward()
    trained = {name: p for name, p in trainable.named_parameters() if p.grad is not None}
    assert [(n.split(".")[0], n.endswith(".token_embedding.new")) for n in sorted(trained)] == [
        ("text_encoder", True),
        ("text_encoder_2", True),
    ]
    assert [p.shape for p in trainable.trainable_parameters()] == [(2, 32), (2, 32)]
    assert all(p.grad.abs().sum() > 0 for p in trained.values())


def test_a_placeholder_already_in_the_vocabulary_is_refused(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sdxl")
    method, training = TextualInversionMethod(), TrainingParams()
    # The byte-level vocabulary holds every single character.
    with pytest.raises(MethodInputError, match="'r'") as caught:
        method.build(
            base,
            TextualInversionParams(placeholder_token="r", initializer_token="thing"),
            training,
            device=CPU,
        )
    assert caught.value.code == "placeholder_token_exists"
    # A later vector's name counts too; a refused job leaves both tokenizers untouched.
    base.tokenizer_2.add_tokens(["<z>_1"])
    params = TextualInversionParams(placeholder_token="<z>", initializer_token="thing", num_vectors=2)
    with pytest.raises(MethodInputError, match="'<z>_1'"):
        method.build(base, params, training, device=CPU)
    assert len(base.tokenizer) == 514 and len(base.tokenizer_2) == 515
    assert isinstance(base.text_encoder.get_input_embeddings(), torch.nn.Embedding)


def test_a_capitalised_multi_vector_token_is_refused() -> None:
    # diffusers looks for `tok_1` after CLIP lower-cased the prompt: `<X>_1` would never be used.
    with pytest.raises(ValidationError, match="lower case"):
        TextualInversionParams(placeholder_token="<X>", initializer_token="thing", num_vectors=2)
    TextualInversionParams(placeholder_token="<X>", initializer_token="thing")


# --- two steps through the loop ----------------------------------------------------------------


def test_only_the_new_rows_change(trained: Any, tiny_cache: Path) -> None:
    model_id, base, _, _ = trained
    fresh = load_tiny(tiny_cache, model_id)
    for name in ("unet", "vae"):
        own = getattr(fresh, name).state_dict()
        assert all(torch.equal(t, own[k]) for k, t in getattr(base, name).state_dict().items()), name
    for name in ENCODERS[model_id]:
        encoder, original = getattr(base, name), getattr(fresh, name)
        lookup = encoder.get_input_embeddings()
        assert isinstance(lookup, ExtendedEmbedding) and not lookup.original.weight.requires_grad
        assert torch.equal(lookup.original.weight, original.get_input_embeddings().weight)
        own = original.state_dict()
        for key, tensor in encoder.state_dict().items():
            if "token_embedding" not in key:
                assert torch.equal(tensor, own[key]), f"{name}.{key}"
        # The new rows started from the mean of "thing"'s byte tokens and moved.
        thing = fresh.tokenizer("thing", add_special_tokens=False).input_ids
        start = original.get_input_embeddings().weight[thing].mean(dim=0)
        assert lookup.new.shape == (2, 32) and not torch.allclose(lookup.new, start.expand(2, -1))
        assert getattr(base, name.replace("text_encoder", "tokenizer")).convert_tokens_to_ids(
            [TOKEN, f"{TOKEN}_1"]
        ) == [514, 515]


def test_artifact_loads_into_a_fresh_pipeline_and_changes_the_output(trained: Any) -> None:
    model_id, base, result, samples = trained
    assert result.files == [WEIGHT_NAME, "manifest.json"]
    path = result.artifact_dir / WEIGHT_NAME
    with safe_open(path, "pt") as handle:
        assert handle.metadata()["token"] == TOKEN
        keys = set(handle.keys())
    state = load_file(path)
    sdxl = model_id == "tiny-sdxl"
    assert keys == ({"clip_l", "clip_g"} if sdxl else {TOKEN})
    assert all(t.dtype == torch.float32 and t.shape == (2, 32) and t.is_contiguous() for t in state.values())

    pipe = fresh_pipeline(base)
    before = generate(pipe)
    if sdxl:  # diffusers' documented two calls for an SDXL embedding
        pipe.load_textual_inversion(state["clip_l"], token=TOKEN)
        pipe.load_textual_inversion(
            state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:  # the folder as is: the single key names the token
        pipe.load_textual_inversion(str(result.artifact_dir))
    for name in ENCODERS[model_id]:
        loaded = getattr(pipe, name).get_input_embeddings().weight
        assert torch.equal(loaded[514:], getattr(base, name).get_input_embeddings().new.detach()), name
    # Samples during training and generation expand the token into every vector the same way.
    assert pipe.maybe_convert_prompt(f"a photo of a {TOKEN}", pipe.tokenizer) == "a photo of a <x> <x>_1"

    after = generate(pipe)
    # The trained model as it sits in memory (ExtendedEmbedding, tokenizers with the new tokens).
    live = {
        n: getattr(base, n)
        for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        if n in pipe.components
    }
    expected = generate(type(pipe)(**{**pipe.components, **live}))
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    change = (after - before).abs().mean() / before.abs().mean()
    assert change > 0.02, f"the token barely changes the output ({change:.4f})"

    # The training-time sample (the Trainable's own pipeline, expanding the token itself) is what
    # generation with the loaded artifact makes, under the sample's scheduler, seed and steps.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(
        f"a photo of a {TOKEN}", num_inference_steps=SAMPLE_STEPS, generator=generator, height=32, width=32
    )
    difference = np.abs(np.asarray(image.images[0], dtype=int) - np.asarray(samples[0], dtype=int))
    assert len(samples) == 1 and difference.max() <= 1, difference.max()


def test_apply_and_undo_leave_the_cached_pipeline_bit_identical(trained: Any) -> None:
    model_id, base, result, _ = trained
    pipe = fresh_pipeline(base)
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if model_id == "tiny-sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    snapshot = [
        (
            len(t),
            dict(t.added_tokens_encoder),
            e.get_input_embeddings(),
            e.get_input_embeddings().weight.clone(),
            e.get_input_embeddings().weight.data_ptr(),
            e.config.vocab_size,
        )
        for t, e in pairs
    ]
    prompt_ids = token_ids([t for t, _ in pairs], f"a photo of a {TOKEN}")
    before = generate(pipe)

    outputs = []
    for _ in range(2):  # a second request must find no leftover token (loading would refuse it)
        ctx = GenerationContext(pipe, base.path)
        uses = [(TextualInversionMethod(), result.artifact_dir, manifest_of(result), ArtifactUse("a0"))]
        with applied(ctx, uses) as applied_pipe:
            assert all(len(t) == 516 for t, _ in pairs)
            outputs.append(generate(applied_pipe))
        assert not ctx.undo
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], before)

    assert torch.equal(generate(pipe), before)
    for (tokenizer, encoder), (length, added, module, weight, pointer, vocab) in zip(
        pairs, snapshot, strict=True
    ):
        assert len(tokenizer) == length and dict(tokenizer.added_tokens_encoder) == added
        assert encoder.get_input_embeddings() is module and torch.equal(module.weight, weight)
        assert module.weight.data_ptr() == pointer and module.num_embeddings == 514
        assert encoder.config.vocab_size == vocab
    assert token_ids([t for t, _ in pairs], f"a photo of a {TOKEN}") == prompt_ids


# --- learning ----------------------------------------------------------------------------------


def mean_rgb(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) for image in images])


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_the_token_learns_a_colour(model_id: str, tiny_cache: Path, tmp_path: Path) -> None:
    """Blue: the base draws it for "a solid blue image" but not for an unknown word ("a photo of a
    <x>" comes out red-orange), so blue images for the token are what the token learnt."""
    base, result = train_ti(
        tiny_cache, model_id, tmp_path, steps=200, lr=1.5e-2, batch_size=4, images=8, num_vectors=4
    )
    reference = mean_rgb([item.image for item in colour_items(8)]).mean(axis=0)

    def images(pipe: Any, prompt: str) -> list[Image.Image]:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe([prompt] * 4, num_inference_steps=20, generator=generator).images

    pipe = fresh_pipeline(base)
    prompt = f"a photo of a {TOKEN}"
    without = mean_rgb(images(pipe, prompt))
    ctx = GenerationContext(pipe, base.path)
    with applied(
        ctx, [(TextualInversionMethod(), result.artifact_dir, manifest_of(result), ArtifactUse("a0"))]
    ) as p:
        learned = mean_rgb(images(p, prompt))
    before = float(np.linalg.norm(without - reference, axis=1).mean())
    after = float(np.linalg.norm(learned - reference, axis=1).mean())
    print(
        f"{model_id}: reference {reference.round()} before {without.mean(0).round()} ({before:.0f}) "
        f"after {learned.mean(0).round()} ({after:.0f})"
    )
    # Measured (mean colour distance to the training images): tiny-sd 266 -> 44, tiny-sdxl 237 -> 51
    # (SDXL's default guidance 5). Two vectors learnt "a photo of a <x>" on SD but not on SDXL.
    # With diffusers 0.42.1 / transformers 5.25 (2026-12-04, the pre-change commit too): tiny-sdxl
    # 227 -> 122, still blue-dominant.
    assert after < 0.6 * before and after < 140.0, (before, after)
    # Every learned image is blue-dominant; no base image with the unknown token is.
    assert all(b > max(r, g) for r, g, b in learned), learned
    assert not any(b > max(r, g) for r, g, b in without), without
