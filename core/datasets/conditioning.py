"""Conditioning images the worker computes itself: Canny edge maps for ControlNet datasets that
come without conditioning images.

A plain numpy Canny (no OpenCV in the worker image): Gaussian blur, Sobel gradients, non-maximum
suppression along the gradient direction, a double threshold and hysteresis. Thresholds are on the
Sobel magnitude of the 0-255 luma image, the scale OpenCV's `Canny(..., L2gradient=True)` uses, so
the usual 100 / 200 mean what users expect. Edges are white on black, RGB, as ControlNet canny
datasets and annotators make them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BLUR_SIGMA = 1.4  # the classic Canny smoothing; a 5-tap kernel covers it
BLUR_RADIUS = 2
# A pixel's two neighbours along its gradient, for the four quantised directions (dy, dx): 0°, 45°,
# 90°, 135°, measured in image coordinates (y grows downwards).
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))
NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _convolve_separable(image: np.ndarray, along_y: np.ndarray, along_x: np.ndarray) -> np.ndarray:
    """Correlate with the outer product of two odd 1-D kernels; borders replicate the edge pixels,
    so a flat image stays flat up to its border (no false edges at the frame)."""
    ry, rx = len(along_y) // 2, len(along_x) // 2
    padded = np.pad(image, ((ry, ry), (rx, rx)), mode="edge")
    height, width = image.shape
    rows = sum(w * padded[i : i + height, :] for i, w in enumerate(along_y))
    return sum(w * rows[:, j : j + width] for j, w in enumerate(along_x))


def gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel (gx, gy) of the blurred image; float64, same shape."""
    taps = np.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=np.float64)
    gauss = np.exp(-(taps**2) / (2 * BLUR_SIGMA**2))
    gauss /= gauss.sum()
    blurred = _convolve_separable(gray.astype(np.float64), gauss, gauss)
    smooth, diff = np.array([1.0, 2.0, 1.0]), np.array([-1.0, 0.0, 1.0])
    return _convolve_separable(blurred, smooth, diff), _convolve_separable(blurred, diff, smooth)


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep a pixel only where it is the ridge across the edge."""
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45.0) % 4).astype(np.int64)
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape
    keep = np.zeros(magnitude.shape, dtype=bool)
    for index, (dy, dx) in enumerate(DIRECTIONS):
        ahead = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        behind = padded[1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        # Strict on one side only: a symmetric two-pixel ridge keeps one pixel, not both or neither.
        keep |= (sector == index) & (magnitude > behind) & (magnitude >= ahead)
    return keep


def _hysteresis(strong: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through other candidates) to a strong pixel; breadth-first from the
    strong pixels, so the cost follows the number of edge pixels, not the length of a chain."""
    height, width = candidates.shape
    stride = width + 2
    # One false pixel of border: neighbour offsets in the flat index never wrap to another row.
    allowed = np.pad(candidates, 1).ravel()
    kept = np.zeros_like(allowed)
    offsets = np.array([dy * stride + dx for dy, dx in NEIGHBOURS_8])
    frontier = np.flatnonzero(np.pad(strong & candidates, 1).ravel())
    kept[frontier] = True
    while frontier.size:
        reached = (frontier[:, None] + offsets).ravel()
        reached = np.unique(reached[allowed[reached] & ~kept[reached]])
        kept[reached] = True
        frontier = reached
    return kept.reshape(height + 2, stride)[1:-1, 1:-1]


def canny_mask(gray: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """Boolean edge mask of a 2-D 0-255 image. Ridge pixels above `high_threshold` are edges, and so
    are ridge pixels above `low_threshold` connected to them."""
    gx, gy = gradients(gray)
    magnitude = np.hypot(gx, gy)
    ridge = _thin(magnitude, gx, gy)
    return _hysteresis(ridge & (magnitude > high_threshold), ridge & (magnitude > low_threshold))


def canny(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200) -> Image.Image:
    """White-on-black RGB edge map of `image`, the same size."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = canny_mask(gray, low_threshold, high_threshold)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[:, :, None], 3, axis=2), "RGB")
