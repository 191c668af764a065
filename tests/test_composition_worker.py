"""Composition on the generate worker's side (core.generation.inference) on the tiny bases, one thread:
nothing an artifact did leaks into the next request (bit-equal to the plain base), the four
schedulers, seed + i per image, artifacts cached by content, the IP-Adapter image encoder loaded
once per base, the base architecture a manifest records, and the whole path from the API to PNGs.
Every method's artifact is trained once for the module (`trained`).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from core.bases.allow_list import BUILTIN_ARCHITECTURES, architecture_of_folder
from core.bases.tiny import shipped_folder
from core.config import Settings
from core.generation import inference
from core.generation.inference import Use, artifact_dir, run_generation
from core.methods.context import SCHEDULERS
from core.models import Artifact
from core.storage.artifacts import ArtifactError, read_manifest, sha256_file
from core.storage.factory import make_storage
from core.storage.local import LocalStorage
from tests import composition_fixtures as fixtures
from tests import test_training_loop as shared
from tests.composition_fixtures import GREY, MAGENTA, PROMPT, Worker, scene, train_artifact
from tests.db_fixtures import ApiTenant
from tests.test_controlnet import Item
from tests.test_generation_api import make_artifact, post, request
from tests.test_methods_e2e import PARAMS as TWO_STEP_PARAMS

one_thread, tiny_cache, solid = shared.one_thread, shared.tiny_cache, shared.solid
fresh_worker_caches, worker, bases = fixtures.fresh_worker_caches, fixtures.worker, fixtures.bases


# Two training steps of each method (the HTTP test's recipes, plus a LoRA): enough to change the
# output, which is all the leak tests need.
RECIPES: dict[str, dict[str, Any]] = {**TWO_STEP_PARAMS, "lora": {"rank": 4}}


@pytest.fixture(scope="module")
def trained(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One artifact folder of every method, trained two steps on tiny-sd."""
    rng = np.random.default_rng(0)
    items = []
    for index in range(4):
        image, mask = scene(MAGENTA, (0.3 + 0.13 * index, 0.5), GREY, rng)
        items.append(Item(image, "a photo of sks", f"{index:02d}.png", mask))
    root = tmp_path_factory.mktemp("trained")
    lr = {"lora": 2e-2, "hypernetwork": 1e-2, "controlnet": 1e-2, "ip_adapter": 1e-2}
    return {
        method: train_artifact(
            shipped_folder("tiny-sd"),
            root / method,
            {"method": method, **params},
            items,
            learning_rate=lr.get(method, 1e-3),
        )
        for method, params in RECIPES.items()
    }


def pipeline_state(pipe: Any) -> dict[str, Any]:
    """What an artifact may change on the cached pipeline, by identity where identity matters."""
    unet = pipe.unet
    return {
        "modules": {name: id(module) for name, module in pipe.components.items()},
        "processors": {name: id(proc) for name, proc in unet.attn_processors.items()},
        "vocabulary": len(pipe.tokenizer),
        "embeddings": pipe.text_encoder.get_input_embeddings().weight.shape,
        "peft": getattr(unet, "peft_config", None),
        "encoder_hid_proj": unet.encoder_hid_proj,
        "config": dict(pipe.config),
    }


def every_use(worker: Worker, trained: dict[str, Path]) -> list[Use]:
    mask = scene(MAGENTA, (0.3, 0.3), GREY, np.random.default_rng(1))[1]
    images = {"controlnet": mask, "ip_adapter": solid(MAGENTA)}
    scales = {"lora": 0.8, "hypernetwork": 1.0, "controlnet": 1.0, "ip_adapter": 0.7}
    return [
        Use(worker.upload(method, folder), scales.get(method, 1.0), images.get(method))
        for method, folder in trained.items()
    ]


def test_nothing_an_artifact_did_leaks_into_the_next_request(
    worker: Worker, trained: dict[str, Path]
) -> None:
    plain = worker.generate()
    cached = inference._pipelines["tiny-sd"]
    before = pipeline_state(cached.pipe)

    lora = worker.generate([Use(worker.upload("lora", trained["lora"]), 0.8, None)])
    assert np.abs(lora - plain).mean() > 1e-3, "the LoRA did not change the output"
    np.testing.assert_array_equal(worker.generate(), plain)

    everything = worker.generate(every_use(worker, trained))
    assert np.abs(everything - plain).mean() > 1e-2
    after = worker.generate()
    np.testing.assert_array_equal(after, plain)
    # The very pipeline that served them all, put back as it was: not a fresh load.
    assert inference._pipelines["tiny-sd"] is cached
    assert pipeline_state(cached.pipe) == before
    assert cached.pipe.image_encoder is None and cached.pipe.feature_extractor is None


def test_each_scheduler_gives_its_own_valid_image_and_none_leaks(worker: Worker) -> None:
    default = worker.generate(steps=6)
    pipe = inference._pipelines["tiny-sd"].pipe
    own, config = pipe.scheduler, dict(pipe.scheduler.config)
    images = {name: worker.generate(steps=6, scheduler=name) for name in SCHEDULERS}
    for name, image in images.items():
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all(), name
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.02, name
    differences = {
        (a, b): float(np.abs(images[a] - images[b]).mean()) for a, b in itertools.combinations(images, 2)
    }
    # DDIM is Euler's step in another parametrisation (measured: 0.003 apart, from the last step,
    # which DDIM ends at alphas_cumprod[0] and Euler at sigma 0).
    assert differences.pop(("ddim", "euler")) > 1e-3
    # The deterministic solvers approach one ODE solution, and the better the base the closer they
    # come: DPM++ 2M was 0.04 from DDIM/Euler on the 550-step tiny-sd, 0.012 on the 900-step one.
    # Ancestral Euler adds noise each step (0.27 from the others).
    ancestral = {pair: d for pair, d in differences.items() if "euler_a" in pair}
    solvers = {pair: d for pair, d in differences.items() if "euler_a" not in pair}
    assert min(solvers.values()) > 5e-3, differences
    assert min(ancestral.values()) > 0.02, differences
    # The base ships DDIM: asked for by name it is the same sampler, made afresh from the same config.
    np.testing.assert_array_equal(images["ddim"], default)
    assert pipe.scheduler is own and dict(pipe.scheduler.config) == config
    np.testing.assert_array_equal(worker.generate(steps=6), default)


@pytest.mark.parametrize("scheduler", [None, "euler_a"])
def test_image_i_uses_seed_plus_i_and_can_be_made_alone(worker: Worker, scheduler: str | None) -> None:
    batch = worker.generate(seed=40, num_images=3, scheduler=scheduler)
    assert batch.shape == (3, 32, 32, 3)
    assert min(np.abs(a - b).mean() for a, b in itertools.combinations(batch, 2)) > 1e-3
    for index in (0, 2):
        alone = worker.generate(seed=40 + index, scheduler=scheduler)[0]
        # Batched convolutions may round differently from single ones; the noise is the same.
        np.testing.assert_allclose(alone, batch[index], atol=1e-4)


def test_the_ip_adapter_image_encoder_is_loaded_once_per_base(
    worker: Worker, trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.methods.ip_adapter as ip_adapter

    loads: list[Path] = []
    original = ip_adapter.load_image_encoder

    def counting(path: Path | None, **kwargs: Any) -> Any:
        loads.append(path)
        return original(path, **kwargs)

    monkeypatch.setattr(ip_adapter, "load_image_encoder", counting)
    use = Use(worker.upload("ip_adapter", trained["ip_adapter"]), 1.0, solid(MAGENTA))
    plain = worker.generate()
    first, second = worker.generate([use]), worker.generate([use])
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - plain).mean() > 1e-3
    assert len(loads) == 1, loads  # by the worker, for both requests; never by the adapter's apply
    pipe = inference._pipelines["tiny-sd"].pipe
    assert pipe.image_encoder is None  # lent to each request, never left on the cached pipeline
    np.testing.assert_array_equal(worker.generate(), plain)


# --- artifacts on the worker's disk ---------------------------------------------------------------


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched: list[str] = []

    def get_file(self, key: str, path: Path) -> None:
        self.fetched.append(key)
        super().get_file(key, path)


@pytest.fixture
def counting(worker: Worker, tmp_path: Path) -> Worker:
    return Worker(worker.settings, CountingStorage(tmp_path / "counted"))


def test_identical_artifacts_share_one_local_copy(counting: Worker, trained: dict[str, Path]) -> None:
    first = counting.upload("lora", trained["lora"], "art_one")
    second = counting.upload("lora", trained["lora"], "art_two")
    local = artifact_dir(first, counting.storage, counting.settings)
    assert artifact_dir(second, counting.storage, counting.settings) == local
    assert counting.storage.fetched == [f"{first.storage_prefix}/{name}" for name in primary_files(first)]
    assert local.name == inference.content_key(first.manifest)
    # Generation reads the primary files only: exports stay in storage.
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == sorted(
        primary_files(first)
    )


def primary_files(artifact: Artifact) -> list[str]:
    return [f["name"] for f in artifact.manifest["files"] if not f["name"].startswith("exports/")]


def retrained(folder: Path, out: Path) -> Path:
    """A copy of the LoRA artifact `folder` with other weights and a manifest that says so."""
    shutil.copytree(folder, out)
    weights = out / "pytorch_lora_weights.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)
    manifest = read_manifest(out)
    for entry in manifest["files"]:
        if entry["name"] == weights.name:
            entry["sha256"], entry["bytes"] = sha256_file(weights), weights.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_replaced_artifact_is_never_served_stale(
    counting: Worker, trained: dict[str, Path], tmp_path: Path
) -> None:
    old = counting.upload("lora", trained["lora"], "art_x")
    old_dir = artifact_dir(old, counting.storage, counting.settings)
    # The same id and prefix, its files replaced.
    new = counting.upload("lora", retrained(trained["lora"], tmp_path / "retrained"), "art_x")
    new_dir = artifact_dir(new, counting.storage, counting.settings)
    assert new_dir != old_dir
    name = "pytorch_lora_weights.safetensors"
    assert sha256_file(new_dir / name) == sha256_file(tmp_path / "retrained" / name)
    assert sha256_file(new_dir / name) != sha256_file(old_dir / name)


def test_a_file_that_does_not_match_its_sha256_is_refused(counting: Worker, trained: dict[str, Path]) -> None:
    artifact = counting.upload("lora", trained["lora"], "art_bad")
    name = primary_files(artifact)[0]
    counting.storage.put_bytes(f"{artifact.storage_prefix}/{name}", b"not the trained weights")
    with pytest.raises(ArtifactError, match="sha256"):
        artifact_dir(artifact, counting.storage, counting.settings)
    cache = counting.settings.model_cache / "artifacts"
    assert list(cache.iterdir()) == [], "no partial copy is left behind"


def test_a_manifest_without_file_hashes_is_cached_by_artifact_id(
    counting: Worker, trained: dict[str, Path]
) -> None:
    artifact = counting.upload("lora", trained["lora"], "art_old")
    artifact.manifest = {"files": []}  # as some early rows hold it
    local = artifact_dir(artifact, counting.storage, counting.settings)
    assert local.name == "art_old" and (local / "manifest.json").is_file()


# --- the manifest records the base's architecture -------------------------------------------------


def test_builtin_architectures_are_those_of_the_built_folders(tiny_cache: Path) -> None:
    for name, architecture in BUILTIN_ARCHITECTURES.items():
        assert architecture_of_folder(shipped_folder(name)) == architecture, name


def test_a_trained_artifact_records_its_base_architecture(trained: dict[str, Path]) -> None:
    manifest = read_manifest(trained["lora"])
    assert manifest["base_model"] == {"id": "tiny-sd", "family": "sd"}
    assert manifest["base_architecture"] == BUILTIN_ARCHITECTURES["tiny-sd"]


# --- the whole path: API, worker, PNGs --------------------------------------------------------------


def test_a_generation_through_the_api_stores_pngs_with_each_images_seed(
    api_client: TestClient,
    bases: Settings,
    acme: ApiTenant,
    tiny_cache: Path,
    trained: dict[str, Path],
) -> None:
    bases.base_models["tiny-sd"] = str(shipped_folder("tiny-sd"))
    bases.device = "cpu"
    storage = make_storage(bases)
    lora = make_artifact(api_client, bases, acme, "lora", files=trained["lora"])
    generation = request(
        base_model="tiny-sd-copy",
        prompt=PROMPT,
        steps=3,
        seed=11,
        num_images=3,
        scheduler="euler_a",
        loras=[{"artifact_id": lora, "scale": 0.8}],
    )
    bases.base_models["tiny-sd-copy"] = str(shipped_folder("tiny-sd"))  # the worker builds nothing

    def run(body: dict[str, Any]) -> list[Image.Image]:
        response = post(api_client, acme, body)
        assert response.status_code == 201, response.text
        generation_id = response.json()["id"]
        assert run_generation(generation_id=generation_id, settings=bases, storage=storage) == "succeeded"
        got = api_client.get(f"/v1/generations/{generation_id}", headers=acme.headers).json()
        return [
            Image.open(io.BytesIO(api_client.get(i["url"], headers=acme.headers).content))
            for i in got["images"]
        ]

    images = run(generation)
    assert len(images) == 3
    for index, image in enumerate(images):
        parameters = json.loads(image.text["parameters"])
        assert (parameters["seed"], parameters["index"], parameters["scheduler"]) == (
            11 + index,
            index,
            "euler_a",
        )
        assert parameters["loras"] == [{"artifact_id": lora, "scale": 0.8}]
    alone = run({**generation, "seed": 13, "num_images": 1})
    difference = np.abs(np.asarray(alone[0], dtype=np.int16) - np.asarray(images[2], dtype=np.int16))
    assert difference.max() <= 1  # the same image, up to 8-bit rounding of batched arithmetic

    # No seed: the API draws one, so the stored request says how to make the images again.
    unseeded = {k: v for k, v in generation.items() if k != "seed"}
    stored = post(api_client, acme, unseeded).json()["request"]
    assert isinstance(stored["seed"], int)
