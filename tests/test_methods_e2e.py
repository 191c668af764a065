"""Every method over HTTP, as users drive it: upload a dataset, train two steps, then generate with
the artifact through `POST /v1/generations` — and the picture differs from the plain base's.

One embedded stack (SQLite, local files, the filesystem broker, real worker processes) runs all
five methods; the jobs queue up behind the one training worker as they would in production.
"""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cli.client import AtelierClient
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)
TRAINING = {"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "seed": 1}
# A hypernetwork's K/V MLPs start as a near-identity residual: two steps at 1e-3 moved the picture
# by 0.2 (mean of 0-255 values) on the pinned tiny-sd, under the 0.5 that tells "applied" here.
LEARNING_RATES = {"hypernetwork": 1e-2}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(index: int) -> tuple[Image.Image, Image.Image]:
    """A magenta square at a varying place on grey, and its mask (the conditioning image)."""
    image, mask = Image.new("RGB", (32, 32), (128, 128, 128)), Image.new("RGB", (32, 32), (0, 0, 0))
    left, top = 2 + 5 * (index % 3), 2 + 6 * (index // 3)
    for target, fill in ((image, MAGENTA), (mask, (255, 255, 255))):
        ImageDraw.Draw(target).rectangle((left, top, left + 13, top + 13), fill=fill)
    return image, mask


def _dataset_zip(path: Path, *, conditioning: bool) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(4):
            image, mask = _scene(index)
            archive.writestr(f"images/{index:02d}.png", _png(image))
            archive.writestr(f"images/{index:02d}.txt", "a photo of sks")
            if conditioning:
                archive.writestr(f"conditioning/{index:02d}.png", _png(mask))
    return path


def _data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


PARAMS: dict[str, dict[str, Any]] = {
    "dreambooth": {
        "instance_prompt": "a photo of sks",
        "class_prompt": "a photo",
        "num_class_images": 2,
        "class_inference_steps": 2,
    },
    "textual_inversion": {"placeholder_token": "<sks>", "initializer_token": "magenta"},
    "hypernetwork": {"layer_structure": [1, 2, 1], "activation": "relu"},
    "controlnet": {},
    "ip_adapter": {},
}


def _use(method: str, artifact_id: str) -> dict[str, Any]:
    """The generation request's field for one artifact of `method`."""
    scene, mask = _scene(5)
    return {
        "dreambooth": {"dreambooth": {"artifact_id": artifact_id}},
        "textual_inversion": {"textual_inversions": [{"artifact_id": artifact_id}]},
        "hypernetwork": {"hypernetwork": {"artifact_id": artifact_id, "strength": 1.0}},
        "controlnet": {"controlnet": {"artifact_id": artifact_id, "image": _data_uri(mask), "scale": 1.0}},
        "ip_adapter": {"ip_adapter": {"artifact_id": artifact_id, "image": _data_uri(scene), "scale": 1.0}},
    }[method]


def _generate(client: AtelierClient, prompt: str, extra: dict[str, Any]) -> np.ndarray:
    body = {"base_model": "tiny-sd", "prompt": prompt, "steps": 3, "seed": 5, **extra}
    generation = client.wait_generation(client.generate(body)["id"], timeout_s=300)
    assert generation["status"] == "succeeded", (extra, generation["error"])
    image = Image.open(io.BytesIO(client.fetch(generation["images"][0]["url"])))
    return np.asarray(image.convert("RGB"), dtype=np.float32)


EXPORTS = {
    "lora": ("kohya", ".safetensors"),
    "textual_inversion": ("a1111", ".safetensors"),
    "hypernetwork": ("a1111", ".pt"),
    "controlnet": ("single_file", ".safetensors"),
    "dreambooth": ("single_file", ".safetensors"),
    "ip_adapter": ("bin", ".bin"),
}


def _check_export(client: AtelierClient, artifact_id: str, method: str, tmp_path: Path) -> None:
    """The other-tools format downloads over HTTP with its own file name and loads safely."""
    import torch
    from safetensors.torch import load_file

    format, suffix = EXPORTS[method]
    response = client.http.get(f"/v1/artifacts/{artifact_id}/download", params={"format": format})
    assert response.status_code == 200, (method, response.text)
    disposition = response.headers["content-disposition"]
    assert suffix in disposition and "exports" not in disposition, disposition
    path = tmp_path / f"{method}{suffix}"
    path.write_bytes(response.content)
    # Pickled formats must load without running code: only plain types inside.
    loaded = torch.load(path, weights_only=True) if suffix in (".pt", ".bin") else load_file(path)
    assert loaded, method


def test_every_method_trains_and_generates_over_http(embedded_stack: Stack, tmp_path: Path) -> None:
    embedded_stack.start_api(with_worker=True)
    client = embedded_stack.client()
    plain = client.upload_dataset([_dataset_zip(tmp_path / "plain.zip", conditioning=False)])
    controlled = client.upload_dataset([_dataset_zip(tmp_path / "controlled.zip", conditioning=True)])
    assert controlled["report"]["counts"]["conditioned"] == 4

    jobs = {}
    for method, params in PARAMS.items():
        dataset = controlled if method == "controlnet" else plain
        body = {
            "base_model": "tiny-sd",
            "dataset_id": dataset["id"],
            "params": {"method": method, **params},
            "training": {**TRAINING, "learning_rate": LEARNING_RATES.get(method, TRAINING["learning_rate"])},
        }
        jobs[method] = client.create_job(body)["id"]
    # A second DreamBooth job with the same class prompt reuses the stored class images.
    again = dict(PARAMS["dreambooth"], instance_prompt="a photo of zwx")
    jobs["dreambooth-again"] = client.create_job(
        {
            "base_model": "tiny-sd",
            "dataset_id": plain["id"],
            "params": {"method": "dreambooth", **again},
            "training": TRAINING,
        }
    )["id"]

    finished = {name: client.wait(job_id, timeout_s=900) for name, job_id in jobs.items()}
    for name, job in finished.items():
        assert job["status"] == "succeeded", (name, job["error"], embedded_stack.log("worker"))

    reuse = [
        event["data"]["reused"]
        for name in ("dreambooth", "dreambooth-again")
        for event in client.get(f"/v1/jobs/{jobs[name]}/events", limit=1000)["data"]
        if event["type"] == "cached_images"
    ]
    assert reuse == [False, True]

    for method in PARAMS:
        _check_export(client, finished[method]["artifact_id"], method, tmp_path)

    prompt = "a photo of <sks>"
    base_image = _generate(client, prompt, {})
    for method in PARAMS:
        artifact = client.artifact(finished[method]["artifact_id"])
        assert artifact["method"] == method
        image = _generate(client, prompt, _use(method, artifact["id"]))
        assert np.abs(image - base_image).mean() > 0.5, f"{method}: the artifact did not change the output"
    # Nothing leaks: after all those requests the plain base gives the same picture again.
    np.testing.assert_array_equal(_generate(client, prompt, {}), base_image)
