"""The synthetic world the tiny bases are pre-trained on: coloured shapes on coloured backgrounds.

Captions read like "a red circle on a blue background" or "a solid green image". The palette leaves
out magenta, orange and purple on purpose: fine-tuning tests teach the base one of those colours
("a photo of sks" -> magenta) and must be able to tell a learned colour from one the base already
knew. Everything here is numpy + torch tensors so tests can make datasets from the same world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (35, 70, 225),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SOLID_FRACTION = 0.25
# Small per-image colour jitter so a colour word means a neighbourhood, not one exact RGB value.
COLOUR_JITTER = 12
CENTRE_JITTER = 0.08


@dataclass(frozen=True)
class Scene:
    shape: str | None  # None: a solid colour image
    fg: str
    bg: str
    cx: float  # centre and radius as fractions of the image side
    cy: float
    r: float

    @property
    def caption(self) -> str:
        if self.shape is None:
            return f"a solid {self.fg} image"
        return f"a {self.fg} {self.shape} on a {self.bg} background"


def all_captions() -> list[str]:
    solids = [f"a solid {c} image" for c in COLOURS]
    shapes = [
        f"a {fg} {shape} on a {bg} background"
        for shape in SHAPES
        for fg in COLOURS
        for bg in COLOURS
        if fg != bg
    ]
    return solids + shapes


def unrelated_captions(n: int, seed: int) -> list[str]:
    """Captions about nothing in this world ("a photo of qovt"), paired in pre-training with random
    images. The base learns that words it does not know carry no information, so a prompt like
    "a photo of sks" gives ordinary palette images, not whatever colour a random encoder implies."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    templates = ("a photo of {}", "{}", "a {} {}", "an image of {} {}")

    def word() -> str:
        return "".join(rng.choice(letters, size=int(rng.integers(2, 7))))

    captions = []
    for _ in range(n):
        template = templates[int(rng.integers(len(templates)))]
        captions.append(template.format(*(word() for _ in range(template.count("{}")))))
    return captions


def sample_scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    scenes = []
    for _ in range(n):
        fg, bg = rng.choice(names, size=2, replace=False)
        if rng.random() < SOLID_FRACTION:
            scenes.append(Scene(None, str(fg), str(fg), 0.5, 0.5, 0.0))
            continue
        r = float(rng.uniform(0.24, 0.36))
        # Near the centre: with the shape anywhere, a minute of pre-training only learned a blur
        # of the two colours; centred, the layout is learnable and "centre vs corners" testable.
        cx, cy = (float(v) for v in 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2))
        scenes.append(Scene(str(rng.choice(SHAPES)), str(fg), str(bg), cx, cy, r))
    return scenes


def _mask(scene: Scene, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (xs + 0.5) / size - scene.cx, (ys + 0.5) / size - scene.cy
    if scene.shape == "circle":
        return x**2 + y**2 <= scene.r**2
    if scene.shape == "square":
        half = scene.r * 0.85  # same visual area class as the circle
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if scene.shape == "triangle":
        # Upright triangle: inside the base line and the two slanted edges.
        return (y <= scene.r * 0.8) & (y >= -scene.r + 2 * np.abs(x) * 1.1)
    return np.zeros((size, size), dtype=bool)


def render(scene: Scene, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 HWC RGB image of one scene."""
    rng = rng or np.random.default_rng(0)

    def colour(name: str) -> np.ndarray:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        return np.clip(np.array(COLOURS[name]) + jitter, 0, 255)

    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = colour(scene.bg)
    if scene.shape is not None:
        image[_mask(scene, size)] = colour(scene.fg)
    return image.astype(np.uint8)


def any_colour_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """Scenes in arbitrary colours, for the VAE: it must reconstruct colours the UNet never learns
    (a fine-tune teaching magenta needs a VAE that can draw magenta). A third of the channel values
    sit at 0 or 255 so the corners of the colour cube (pure magenta, pure cyan...) are well covered.
    """
    rng = np.random.default_rng(seed)
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(sample_scenes(n, seed)):
        bg, fg = rng.integers(0, 256, size=(2, 3))
        extreme = rng.random((2, 3)) < 1 / 3
        bg, fg = np.where(extreme, rng.integers(0, 2, size=(2, 3)) * 255, np.stack([bg, fg]))
        pixels[i] = bg
        if scene.shape is not None:
            pixels[i][_mask(scene, size)] = fg
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n images as a float tensor (n, 3, size, size) in [-1, 1], and their captions."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng(seed + 1)
    pixels = np.stack([render(s, size, rng) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, [s.caption for s in scenes]
