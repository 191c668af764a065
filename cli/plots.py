"""Small PNG figures drawn with Pillow (no plotting library needed): image grids and loss curves."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

Point = tuple[float, float]


def image_grid(rows: list[tuple[str, list[Image.Image]]], path: Path, *, cell: int = 128) -> Path:
    """One labelled row per entry, images scaled (nearest) to `cell` pixels."""
    label_w = 110
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + 4), len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * (cell + 4)
        draw.text((6, top + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(
                image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * (cell + 4), top)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def loss_curve(points: list[Point], path: Path, *, size: tuple[int, int] = (640, 360)) -> Path:
    """A line chart of (step, loss) with axes and min/max labels."""
    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, 10, width - 10, height - margin), outline="black")
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6

        def to_px(p: Point) -> Point:
            x = margin + (p[0] - x0) / (x1 - x0) * (width - 10 - margin)
            y = height - margin - (p[1] - y0) / (y1 - y0) * (height - margin - 10)
            return x, y

        draw.line([to_px(p) for p in points], fill=(200, 30, 60), width=2)
        draw.text((4, 10), f"{y1:.4f}", fill="black")
        draw.text((4, height - margin - 10), f"{y0:.4f}", fill="black")
        draw.text((margin, height - margin + 6), f"step {x0:g}", fill="black")
        draw.text((width - 90, height - margin + 6), f"step {x1:g}", fill="black")
    draw.text((width // 2 - 40, height - 20), "training loss", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def mean_colour(images: list[Image.Image]) -> tuple[float, float, float]:
    totals = [0.0, 0.0, 0.0]
    count = 0
    for image in images:
        pixels = list(image.convert("RGB").getdata())
        for i in range(3):
            totals[i] += sum(p[i] for p in pixels)
        count += len(pixels)
    return (totals[0] / count, totals[1] / count, totals[2] / count)
