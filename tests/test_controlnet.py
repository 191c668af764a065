"""ControlNet: the Canny detector on synthetic shapes; the conditioning embedding sized to the VAE;
conditioning checks; caption dropping; two training steps on the tiny bases → `controlnet/` →
`ControlNetModel.from_pretrained` into a fresh ControlNet pipeline → the output changes, and using it
through a GenerationContext leaves the cached base pipeline bit-identical. The slow test teaches a
ControlNet to put the shape where the conditioning mask says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from core.bases.tiny.world import COLOURS, Scene, render
from core.bases.tiny.world import _mask as shape_mask
from core.datasets.conditioning import canny, canny_mask
from core.errors import MethodInputError
from core.jobs.artifact import TrainedArtifact, train_artifact
from core.methods import get_method
from core.methods.context import ArtifactUse, GenerationContext, applied
from core.methods.controlnet import ControlNetMethod, ControlNetTrainable, embedding_channels
from core.spec.job import JobSpec
from core.spec.methods import ControlNetParams
from core.spec.training import TrainingParams
from core.storage.artifacts import verify_manifest
from core.training.caching import Batch, encode_text, tokenize
from core.training.progress import NullHooks
from tests import test_training_loop as shared

CPU = torch.device("cpu")
SIZE = 32
FILES = ["controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"]
one_thread, tiny_cache = shared.one_thread, shared.tiny_cache
load_tiny = shared.load_tiny


@dataclass
class Item:
    image: Image.Image
    caption: str | None
    name: str
    conditioning: Image.Image | None = None


# --- Canny -------------------------------------------------------------------------------------


def square(value: int, box: tuple[int, int, int, int], size: int = 48) -> np.ndarray:
    gray = np.zeros((size, size))
    top, left, bottom, right = box
    gray[top:bottom, left:right] = value
    return gray


def near(mask: np.ndarray, distance: int) -> np.ndarray:
    """`mask` grown by `distance` pixels (square neighbourhood)."""
    grown = np.pad(mask, distance)
    out = np.zeros_like(mask)
    for dy in range(2 * distance + 1):
        for dx in range(2 * distance + 1):
            out |= grown[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def outline(box: tuple[int, int, int, int], size: int = 48) -> np.ndarray:
    """The pixels on either side of the box's border."""
    inside = square(1, box, size).astype(bool)
    return near(inside, 1) & near(~inside, 1)


def test_canny_traces_a_square_and_nothing_else() -> None:
    box = (12, 10, 36, 30)
    edges = canny_mask(square(255, box), 100, 200)
    boundary = outline(box)
    assert not (edges & ~boundary).any(), "edge pixels away from the square's outline"
    top, left, bottom, right = box
    # Every side is traced, one pixel thick (non-maximum suppression), over its straight part.
    for line in (
        edges[top - 1 : top + 1, left + 3 : right - 3],
        edges[bottom - 1 : bottom + 1, left + 3 : right - 3],
    ):
        assert (line.sum(axis=0) == 1).all()
    for line in (
        edges[top + 3 : bottom - 3, left - 1 : left + 1],
        edges[top + 3 : bottom - 3, right - 1 : right + 1],
    ):
        assert (line.sum(axis=1) == 1).all()


def test_canny_traces_a_circle_and_flat_images_have_no_edges() -> None:
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    radius = np.hypot(xs - 30, ys - 34)
    edges = canny_mask(np.where(radius <= 16, 200.0, 30.0), 100, 200)
    assert edges.sum() > 0.8 * 2 * np.pi * 16
    assert (np.abs(radius[edges] - 16) <= 1.5).all()
    assert not canny_mask(np.full((40, 40), 180.0), 0, 0).any()


def test_canny_respects_both_thresholds() -> None:
    faint = square(60, (12, 12, 36, 36))  # strongest gradient ~130 after the blur
    assert not canny_mask(faint, 100, 200).any(), "below the high threshold: no edge at all"
    assert canny_mask(faint, 50, 100).any(), "above it: the outline appears"
    assert not canny_mask(faint, 150, 150).any()

    # Hysteresis: an edge whose contrast fades from strong to faint is kept to its faint end, where
    # the same faint edge on its own is dropped; the low threshold still ends it.
    fading = np.zeros((48, 64))
    fading[:, 24:] = np.linspace(255, 40, 48)[:, None]  # gradient ~550 at the top, ~90 at the bottom
    rows = canny_mask(fading, 50, 200).any(axis=1)
    assert rows.all() and (np.nonzero(canny_mask(fading, 50, 200))[1] == 24).all()
    assert not canny_mask(np.where(fading > 0, 60.0, 0.0), 50, 200).any()
    ended = canny_mask(fading, 150, 200).any(axis=1)
    assert ended[:38].all() and not ended[42:].any()  # the gradient passes 150 near row 40


def test_canny_image_is_white_on_black_rgb() -> None:
    image = Image.fromarray(render(Scene("circle", "yellow", "blue", 0.5, 0.5, 0.3), 64))
    edges = canny(image, 100, 200)
    pixels = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == image.size
    assert set(np.unique(pixels)) == {0, 255}
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[..., 0].mean() < 40  # thin lines on black


# --- build and training items ---------------------------------------------------------------------


def test_embedding_channels_follow_the_vae_factor() -> None:
    assert embedding_channels(ControlNetParams(), 8) == (16, 32, 96, 256)
    assert embedding_channels(ControlNetParams(), 2) == (16, 32)
    assert embedding_channels(ControlNetParams(conditioning_embedding_out_channels=[8, 8, 16]), 4) == (
        8,
        8,
        16,
    )
    with pytest.raises(MethodInputError, match="needs 2 entries") as error:
        embedding_channels(ControlNetParams(conditioning_embedding_out_channels=[16, 32, 96, 256]), 2)
    assert error.value.code == "conditioning_embedding_mismatch"
    with pytest.raises(MethodInputError, match="needs 5 entries"):
        embedding_channels(ControlNetParams(), 16)


def mask_image(scene: Scene) -> Image.Image:
    mask = shape_mask(scene, SIZE)
    return Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2))


def shape_items(n: int, *, fg: str = "yellow", bg: str = "blue", seed: int = 0) -> list[Item]:
    """A square at random positions; its binary mask is the conditioning image."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        cx, cy = rng.uniform(0.22, 0.78, size=2)
        scene = Scene("square", fg, bg, float(cx), float(cy), 0.2)
        image = Image.fromarray(render(scene, SIZE, rng))
        items.append(Item(image, scene.caption, f"img{i}.png", mask_image(scene)))
    return items


def build(base: Any, **params: Any) -> ControlNetTrainable:
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        if getattr(base, name) is not None:
            getattr(base, name).requires_grad_(False)
    return ControlNetMethod().build(base, ControlNetParams(**params), TrainingParams(), device=CPU)


def test_trainable_is_the_whole_controlnet_and_only_it(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    trainable = build(base)
    controlnet = trainable.controlnet
    assert list(controlnet.config.conditioning_embedding_out_channels) == [16, 32]
    assert trainable.trainable_parameters() == list(controlnet.parameters())
    assert controlnet.dtype == torch.float32
    # Copied from the base UNet, with zero-initialised output convolutions.
    torch.testing.assert_close(controlnet.conv_in.weight, base.unet.conv_in.weight, rtol=0, atol=0)
    zero = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    assert all(not p.any() for block in zero for p in block.parameters())


def test_missing_or_misshapen_conditioning_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    items = shape_items(3)
    items[1].conditioning = None
    spec = JobSpec(
        base_model="tiny-sd", dataset_id="ds", params={"method": "controlnet"}, training={"max_steps": 1}
    )
    with pytest.raises(
        MethodInputError, match=r"1 image\(s\) have no conditioning image \(img1.png\)"
    ) as error:
        train_artifact(spec=spec, base=base, items=items, workdir=tmp_path, hooks=NullHooks(), device=CPU)
    assert error.value.code == "missing_conditioning"

    trainable = build(base)
    items = shape_items(2)
    items[0].conditioning = items[0].conditioning.resize((64, 32))
    with pytest.raises(MethodInputError, match=r"aspect ratio \(img0.png\)"):
        trainable.training_items(items, resolution=SIZE, hooks=NullHooks())
    items[0].conditioning = items[0].conditioning.resize((64, 64))  # same aspect: fitted to the image
    fitted = trainable.training_items(items, resolution=SIZE, hooks=NullHooks()).items
    assert fitted[0].conditioning.size == items[0].image.size


def test_canny_conditioning_is_computed_from_the_images(tiny_cache: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    trainable = build(base, conditioning="canny", canny_low_threshold=50, canny_high_threshold=100)
    items = [Item(item.image, item.caption, item.name) for item in shape_items(2)]
    big = Image.fromarray(render(Scene("circle", "red", "green", 0.5, 0.5, 0.3), 128))
    items.append(Item(big, None, "big.png"))
    made = trainable.training_items(items, resolution=SIZE, hooks=NullHooks()).items
    assert [m.captions for m in made] == [(items[0].caption,), (items[1].caption,), ("",)]
    for item, training_item in zip(items, made, strict=True):
        assert training_item.conditioning.size == item.image.size
    np.testing.assert_array_equal(
        np.asarray(made[0].conditioning), np.asarray(canny(items[0].image, 50, 100))
    )
    # Large images get their edges at the training scale: lines as thick as the image is larger.
    edges = np.asarray(made[2].conditioning)[..., 0] > 0
    assert edges.any() and edges.mean() > 2 * (np.asarray(canny(big, 50, 100))[..., 0] > 0).mean()
    assert trainable.sample_image is made[0].conditioning


def hand_batch(base: Any, captions: list[str], *, drop: list[float] | None = None) -> Batch:
    generator = torch.Generator().manual_seed(0)
    n = len(captions)
    with torch.no_grad():
        hidden, pooled = encode_text(base, *tokenize(base, captions))
        empty, empty_pooled = encode_text(base, *tokenize(base, [""]))
    return Batch(
        latents=torch.randn(n, 4, 16, 16, generator=generator),
        noise=torch.randn(n, 4, 16, 16, generator=generator),
        timesteps=torch.tensor([100, 700][:n]),
        encoder_hidden_states=hidden,
        pooled_embeds=pooled,
        time_ids=torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * n, dtype=torch.float32)
        if pooled is not None
        else None,
        uncond_hidden_states=empty,
        uncond_pooled_embeds=empty_pooled,
        conditioning=torch.rand(n, 3, SIZE, SIZE, generator=generator),
        drop=torch.tensor(drop) if drop is not None else None,
    )


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_forward_starts_at_the_base_and_drops_captions_per_sample(tiny_cache: Path, model_id: str) -> None:
    base = load_tiny(tiny_cache, model_id)
    trainable = build(base, proportion_empty_prompts=0.5)
    captions = ["a red circle on a blue background", "a green square on a white background"]
    batch = hand_batch(base, captions, drop=[0.2, 0.7])  # the first caption is dropped
    with torch.no_grad():
        loss = trainable(batch)
        # Zero convolutions: before training the ControlNet adds nothing to the base's prediction.
        reference = hand_batch(base, ["", captions[1]])
        reference.drop = None
        plain = super(ControlNetTrainable, trainable).forward(reference)
    torch.testing.assert_close(loss, plain)
    trainable.params = ControlNetParams()
    with torch.no_grad():
        kept = trainable(batch)
    assert not torch.allclose(kept, loss), "with no dropping the caption is used"


# --- round trip ------------------------------------------------------------------------------


class SampleHooks(NullHooks):
    def __init__(self) -> None:
        super().__init__()
        self.samples: list[Any] = []

    def save_samples(self, *, step: int, images: list[Any], prompts: list[str]) -> None:
        self.samples += images


def train_controlnet(
    base: Any,
    workdir: Path,
    items: list[Item],
    hooks: Any,
    params: dict[str, Any] | None = None,
    **training: Any,
) -> TrainedArtifact:
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params={"method": "controlnet", **(params or {})},
        training={"batch_size": 2, "seed": 1, **training},
    )
    return train_artifact(spec=spec, base=base, items=items, workdir=workdir, hooks=hooks, device=CPU)


def generate(pipe: Any, prompt: str, steps: int = 3, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(
            prompt, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs
        ).images


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
def test_two_steps_round_trip_and_leave_the_base_pipeline_untouched(
    tiny_cache: Path, tmp_path: Path, model_id: str
) -> None:
    base = load_tiny(tiny_cache, model_id)
    items = shape_items(4)
    hooks = SampleHooks()
    # Half the captions dropped: the loop's empty prompt and drop draws reach `forward`.
    result = train_controlnet(
        base,
        tmp_path,
        items,
        hooks,
        params={"proportion_empty_prompts": 0.5},
        max_steps=2,
        learning_rate=1e-2,
        sample_prompts=[items[0].caption],
    )
    assert result.files == [*FILES, "manifest.json"]
    verify_manifest(result.artifact_dir)
    assert len(hooks.samples) == 1 and hooks.samples[0].size == (SIZE, SIZE)

    # diffusers' own loader: the trained ControlNet, its zero convolutions no longer zero.
    loaded = ControlNetModel.from_pretrained(result.artifact_dir / "controlnet")
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32]
    assert loaded.controlnet_mid_block.weight.abs().sum() > 0
    sdxl = base.family == "sdxl"
    plain_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    control_cls = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    plain = plain_cls.from_pretrained(base.path)
    plain.set_progress_bar_config(disable=True)
    fresh = control_cls.from_pretrained(base.path, controlnet=loaded)
    fresh.set_progress_bar_config(disable=True)
    prompt, control = items[0].caption, items[1].conditioning
    before = generate(plain, prompt)
    after = generate(fresh, prompt, image=control)
    change = (after - before).abs().mean() / before.abs().mean()
    assert change > 0.02, f"the ControlNet barely changes the output ({change:.4f})"

    # Through the generation context: same output as diffusers' own pipeline, and the cached base
    # pipeline generates bit-identically afterwards.
    ctx = GenerationContext(pipe=plain, base_path=Path(base.path))
    use = ArtifactUse("a0", scale=1.0, image=control)
    with applied(ctx, [(get_method("controlnet"), result.artifact_dir, {}, use)]) as pipe:
        assert pipe is not plain
        through_ctx = generate(pipe, prompt, **ctx.controlnet_kwargs())
    torch.testing.assert_close(through_ctx, after, rtol=0, atol=0)
    assert ctx.undo == []
    torch.testing.assert_close(generate(plain, prompt), before, rtol=0, atol=0)
    half = generate(ctx.pipeline(), prompt, image=control, controlnet_conditioning_scale=0.5)
    assert 0 < (half - before).abs().mean() < (after - before).abs().mean()


# --- learning ---------------------------------------------------------------------------------


def colour_iou(image: Image.Image, scene: Scene) -> float:
    """IoU of the pixels nearer the shape's colour than the background's with the scene's mask."""
    pixels = np.asarray(image, dtype=np.float32)
    fg, bg = (np.array(COLOURS[c], dtype=np.float32) for c in (scene.fg, scene.bg))
    predicted = np.linalg.norm(pixels - fg, axis=2) < np.linalg.norm(pixels - bg, axis=2)
    mask = shape_mask(scene, SIZE)
    return float((predicted & mask).sum() / max((predicted | mask).sum(), 1))


@pytest.mark.slow
def test_controlnet_puts_the_shape_where_the_mask_says(tiny_cache: Path, tmp_path: Path) -> None:
    base = load_tiny(tiny_cache, "tiny-sd")
    result = train_controlnet(
        base, tmp_path, shape_items(16), NullHooks(), max_steps=120, learning_rate=1e-3, batch_size=4, seed=0
    )
    # Corners the training squares (centres drawn uniformly in 0.22-0.78) did not sit in exactly.
    held_out = [
        Scene("square", "yellow", "blue", x, y, 0.2)
        for x, y in [(0.27, 0.27), (0.73, 0.3), (0.3, 0.72), (0.72, 0.7)]
    ]
    plain = StableDiffusionPipeline.from_pretrained(base.path)
    plain.set_progress_bar_config(disable=True)

    def image(pipe: Any, **kwargs: Any) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(held_out[0].caption, num_inference_steps=20, generator=generator, **kwargs).images[0]

    without, with_control = [], []
    for scene in held_out:
        without.append(colour_iou(image(plain), scene))
        ctx = GenerationContext(pipe=plain, base_path=Path(base.path))
        with applied(
            ctx,
            [(get_method("controlnet"), result.artifact_dir, {}, ArtifactUse("c", 1.0, mask_image(scene)))],
        ) as pipe:
            with_control.append(colour_iou(image(pipe, **ctx.controlnet_kwargs()), scene))
    # Measured: the base draws its centred square (IoU ~0.14 with these corner masks); with the
    # ControlNet the square moves into each mask (IoU ~0.75).
    assert np.mean(with_control) > 0.5, (without, with_control)
    assert min(with_control) > max(without) + 0.2, (without, with_control)
