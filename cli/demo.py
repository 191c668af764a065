"""`atelier demo`: the whole user path on the embedded service, over HTTP.

Starts `atelier serve` (SQLite, local storage, a worker child on the filesystem broker), uploads a
synthetic dataset, trains a LoRA that teaches the token "sks" a colour the base never draws,
downloads the artifact, generates with and without it, and writes a before/after grid and a loss
curve.
"""

from __future__ import annotations

import io
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from cli.client import AtelierClient
from cli.plots import image_grid, loss_curve, mean_colour
from cli.progress import ProgressBar
from cli.watch import watch_job
from core.config import get_settings
from core.db import session_scope, upgrade
from core.tenants.keys import create_key

TARGET = (255, 0, 255)  # magenta: the tiny base's synthetic world never shows it
PROMPT = "a photo of sks"
DEFAULT_STEPS = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_dataset_zip(path: Path, *, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Magenta scenes with a little texture, each captioned with the new token."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            shade = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in TARGET)
            image = Image.new("RGB", (size, size), shade)
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(4, 12)
                tint = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in TARGET)
                draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            archive.writestr(f"sks_{index:02d}.png", buffer.getvalue())
            archive.writestr(f"sks_{index:02d}.txt", PROMPT)
    return path


def _wait_ready(base_url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"atelier serve exited with code {server.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the embedded service did not become ready")


def _generate(client: AtelierClient, loras: list[dict[str, Any]]) -> list[Image.Image]:
    gen = client.generate(
        {
            "base_model": "tiny-sd",
            "prompt": PROMPT,
            "steps": 25,
            "guidance_scale": 3.0,
            "seed": 7,
            "num_images": 4,
            "loras": loras,
        }
    )
    gen = client.wait_generation(gen["id"])
    if gen["status"] != "succeeded":
        raise RuntimeError(f"generation failed: {gen['error']}")
    return [Image.open(io.BytesIO(client.fetch(image["url"]))) for image in gen["images"]]


def _distance(colour: tuple[float, float, float]) -> float:
    return math.dist(colour, TARGET)


def run_demo(*, out_dir: str, steps: int | None) -> int:
    settings = get_settings()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        api_key = create_key(session=session, tenant_name=f"demo-{int(time.time())}").secret
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    print(f"ATELIER_HOME={settings.home}; starting the embedded service on {base_url}")
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        env=os.environ.copy(),
        stdout=(settings.home / "serve.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(base_url, server)
        return _run(AtelierClient(base_url, api_key), out, steps or DEFAULT_STEPS)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _run(client: AtelierClient, out: Path, steps: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dataset = client.upload_dataset([make_dataset_zip(Path(tmp) / "sks.zip")], name="demo magenta")
    print(f"dataset {dataset['id']}: {dataset['status']}, {dataset['image_count']} images")
    job = client.create_job(
        {
            "base_model": "tiny-sd",
            "dataset_id": dataset["id"],
            "params": {"method": "lora", "rank": 8, "alpha": 8, "targets": "attention"},
            "training": {
                "max_steps": steps,
                "learning_rate": 2e-3,
                "batch_size": 4,
                "seed": 0,
                "checkpoint_every": max(steps // 3, 1),
                "sample_prompts": [PROMPT],
                "sample_every": max(steps // 3, 1),
            },
        }
    )
    print(f"job {job['id']} queued")
    # The bar follows the job's phases (loading the base, caching, training, upload) over its events.
    job = watch_job(client, job["id"], ProgressBar(label=job["id"]))
    if job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}: {job['error']}", file=sys.stderr)
        return 1
    artifact = client.artifact(job["artifact_id"])
    weights = client.download_artifact(artifact["id"], out / "pytorch_lora_weights.safetensors")
    before = _generate(client, [])
    after = _generate(client, [{"artifact_id": artifact["id"], "scale": 1.0}])
    grid = image_grid([("base", before), ("with LoRA", after)], out / "before_after.png")
    history = artifact["manifest"].get("metrics", {}).get("loss_history", [])
    curve = loss_curve([(float(s), float(v)) for s, v in history], out / "loss_curve.png")
    d_before, d_after = _distance(mean_colour(before)), _distance(mean_colour(after))
    print(f"artifact {artifact['id']} -> {weights}")
    print(f"mean-colour distance to magenta for {PROMPT!r}: base {d_before:.1f}, with LoRA {d_after:.1f}")
    print(f"before/after grid: {grid}")
    print(f"loss curve:        {curve}")
    return 0
