"""Personalisation over HTTP, as users drive it: upload a concept-folder zip, train a hyper_lora,
upload a reference image, and create a lora job with init_from (no dataset, 0 steps: the
prediction alone; and 2 fine-tune steps). Each result is an ordinary LoRA: a kohya export, and a
generation with it differs from the plain base's.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.client import AtelierClient
from tests import hyper_lora_world as world
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _concepts_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for item in world.concept_dataset(seed=0)[: 5 * world.IMAGES_PER_CONCEPT]:
            archive.writestr(item.name, _png(item.image))
    return path


def _generate(stack: Stack, client: AtelierClient, extra: dict) -> np.ndarray:
    body = {"base_model": "tiny-sd", "prompt": world.PROMPT, "steps": 3, "seed": 5, **extra}
    try:
        generation = client.wait_generation(client.generate(body)["id"], timeout_s=600)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{stack.log('api')[-4000:]}") from None
    assert generation["status"] == "succeeded", generation["error"]
    image = Image.open(io.BytesIO(client.fetch(generation["images"][0]["url"])))
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_personalise_from_a_hyper_lora_over_http(embedded_stack: Stack, tmp_path: Path) -> None:
    embedded_stack.start_api(with_worker=True)
    client = embedded_stack.client()
    dataset = client.upload_dataset([_concepts_zip(tmp_path / "concepts.zip")])
    hyper_job = client.create_job(
        {
            "base_model": "tiny-sd",
            "dataset_id": dataset["id"],
            "params": {"method": "hyper_lora", "hidden_dim": 32, "basis_size": 4},
            "training": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4, "checkpoint_every": 1},
        }
    )
    hyper = client.wait(hyper_job["id"], timeout_s=600)
    assert hyper["status"] == "succeeded", (hyper["error"], embedded_stack.log("worker"))
    reference = tmp_path / "reference.png"
    world.concept_images(world.HELD_OUT["magenta"], 1, seed=1)[0].save(reference)
    image_id = client.upload_image(reference)["id"]

    plain = _generate(embedded_stack, client, {})
    for steps in (0, 2):
        job = client.create_job(
            {
                "base_model": "tiny-sd",
                "params": {"method": "lora", "rank": 4},
                "training": {"max_steps": steps, "learning_rate": 1e-3},
                "init_from": {"hyper_lora": hyper["artifact_id"], "images": [image_id]},
            }
        )
        assert job["dataset_id"] is None
        done = client.wait(job["id"], timeout_s=600)
        assert done["status"] == "succeeded", (steps, done["error"], embedded_stack.log("worker"))
        artifact = client.artifact(done["artifact_id"])
        assert artifact["method"] == "lora"
        response = client.http.get(f"/v1/artifacts/{artifact['id']}/download", params={"format": "kohya"})
        assert response.status_code == 200, response.text
        image = _generate(embedded_stack, client, {"loras": [{"artifact_id": artifact["id"], "scale": 1.0}]})
        assert np.abs(image - plain).mean() > 0.5, f"{steps} steps: the LoRA did not change the output"
