"""Composition in POST /v1/generations, on the worker's side and the API's.

The generate worker (core.generation.inference) on the tiny bases, one thread: nothing an artifact did leaks
into the next request (bit-equal to the plain base), the four schedulers, seed + i per image,
artifacts cached by content, the IP-Adapter image encoder loaded once per base. The API refuses an
artifact whose base family or architecture does not fit the request's base, and allows one from
another base of the same family and architecture. The slow test is the seed's pairing: an IP-Adapter
and a ControlNet trained by Atelier, used in one generation, give the reference's colour where the
conditioning mask says.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from core.bases.allow_list import BUILTIN_ARCHITECTURES, architecture_of_folder
from core.bases.tiny.world import COLOURS
from core.config import Settings
from core.generation import inference
from core.generation.inference import Use, artifact_dir, generate_images, run_generation
from core.generation.params import GenerationSpec
from core.jobs import artifact
from core.methods.context import SCHEDULERS
from core.models import Artifact
from core.spec.job import JobSpec
from core.storage.artifacts import ArtifactError, read_manifest, sha256_file
from core.storage.base import Storage, upload_dir
from core.storage.factory import make_storage
from core.storage.local import LocalStorage
from core.training.progress import NullHooks
from tests import test_training_loop as shared
from tests.db_fixtures import ApiTenant
from tests.test_api_contract import assert_problem
from tests.test_controlnet import Item
from tests.test_generation_api import make_artifact, post, request
from tests.test_ip_adapter import colour_items
from tests.test_methods_e2e import PARAMS as TWO_STEP_PARAMS

CPU = torch.device("cpu")
MAGENTA = (255, 0, 255)
GREY, NEAR_BLACK = (128, 128, 128), (20, 20, 20)
one_thread, tiny_cache, solid = shared.one_thread, shared.tiny_cache, shared.solid
PROMPT = "a photo of <sks>"  # the textual inversion's token, so every artifact has its say
PAIRING_PROMPT = "a square on a black background"


@pytest.fixture(autouse=True)
def fresh_worker_caches() -> Iterator[None]:
    # The pipeline LRU is per process: each test starts from bases loaded afresh from disk.
    inference._pipelines.clear()
    yield
    inference._pipelines.clear()


def scene(
    fg: tuple[int, int, int], centre: tuple[float, float], bg: tuple[int, int, int], rng: Any, side: int = 12
) -> tuple[Image.Image, Image.Image]:
    """A square of `fg` on a slightly noisy `bg` (32 px), and its mask (the conditioning image)."""
    noise = rng.integers(-8, 9, size=(32, 32, 3))
    image = Image.fromarray(np.clip(np.array(bg) + noise, 0, 255).astype(np.uint8))
    mask = Image.new("RGB", (32, 32))
    left, top = round(centre[0] * 32 - side / 2), round(centre[1] * 32 - side / 2)
    for target, fill in ((image, fg), (mask, (255, 255, 255))):
        ImageDraw.Draw(target).rectangle((left, top, left + side - 1, top + side - 1), fill=fill)
    return image, mask


def train_artifact(
    base_path: Path, workdir: Path, params: dict[str, Any], items: list[Any], **training: Any
) -> Path:
    base = shared.load_tiny(base_path.parent, base_path.name)
    spec = JobSpec(
        base_model=base.model_id,
        dataset_id="ds",
        params=params,
        training={"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "seed": 1, **training},
    )
    return artifact.train_artifact(
        spec=spec, base=base, items=items, workdir=workdir, hooks=NullHooks(), device=CPU
    ).artifact_dir


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
            tiny_cache / "tiny-sd",
            root / method,
            {"method": method, **params},
            items,
            learning_rate=lr.get(method, 1e-3),
        )
        for method, params in RECIPES.items()
    }


# --- the worker ---------------------------------------------------------------------------------


@dataclass
class Worker:
    """core.generation.inference as the generate worker runs it, over local storage and the tiny-sd folder."""

    settings: Settings
    storage: Storage

    def upload(self, method: str, folder: Path, artifact_id: str | None = None) -> Artifact:
        """An artifact row for `folder`, whose files are uploaded where the row says."""
        artifact_id = artifact_id or f"art_{method}"
        prefix = f"jobs/{artifact_id}/attempt-1"
        upload_dir(self.storage, folder, prefix)
        return Artifact(
            id=artifact_id,
            tenant_id="tenant",
            job_id=f"job_{artifact_id}",
            method=method,
            base_model="tiny-sd",
            storage_prefix=prefix,
            manifest=read_manifest(folder),
        )

    def generate(self, uses: list[Use] | None = None, **fields: Any) -> np.ndarray:
        spec = GenerationSpec.model_validate(
            {"base_model": "tiny-sd", "prompt": PROMPT, "steps": 4, "seed": 3, **fields}
        )
        images = generate_images(
            spec=spec, uses=uses or [], settings=self.settings, storage=self.storage, output_type="np"
        )
        return np.stack(images)


@pytest.fixture
def worker(tiny_cache: Path, tmp_path: Path) -> Worker:
    settings = Settings(
        home=tmp_path,
        model_cache=tmp_path / "models",
        base_models={"tiny-sd": str(tiny_cache / "tiny-sd")},  # the built folder, as a local base
        device="cpu",
    )
    return Worker(settings, LocalStorage(tmp_path / "storage"))


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
        assert architecture_of_folder(tiny_cache / name) == architecture, name


def test_a_trained_artifact_records_its_base_architecture(trained: dict[str, Path]) -> None:
    manifest = read_manifest(trained["lora"])
    assert manifest["base_model"] == {"id": "tiny-sd", "family": "sd"}
    assert manifest["base_architecture"] == BUILTIN_ARCHITECTURES["tiny-sd"]


# --- the API's compatibility check ----------------------------------------------------------------


def manifest_on(base_model: str, family: str | None, architecture: dict[str, Any] | None) -> dict[str, Any]:
    manifest: dict[str, Any] = {"files": [], "base_model": {"id": base_model}}
    if family is not None:
        manifest["base_model"]["family"] = family
    if architecture is not None:
        manifest["base_architecture"] = architecture
    return manifest


SD_ARCH, SDXL_ARCH = BUILTIN_ARCHITECTURES["tiny-sd"], BUILTIN_ARCHITECTURES["tiny-sdxl"]


def local_base(tiny_cache: Path, folder: Path, **unet_changes: Any) -> str:
    """A local diffusers folder with tiny-sd's configs (all the API reads), UNet config changed."""
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_cache / "tiny-sd" / name, folder / name)
    unet = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps({**unet, **unet_changes}))
    return str(folder)


@pytest.fixture
def bases(api_settings: Settings, tiny_cache: Path, tmp_path: Path) -> Settings:
    api_settings.base_models.update(
        {
            "tiny-sd-copy": "builtin:tiny-sd",  # another name for the same base
            "sd-finetune": local_base(tiny_cache, tmp_path / "finetune"),  # same family and architecture
            "sd-wide": local_base(tiny_cache, tmp_path / "wide", cross_attention_dim=48),  # an "SD 2"
            "hub-sd": "hf:example/sd",  # not inspectable by the API
        }
    )
    return api_settings


def incompatible(client: TestClient, tenant: ApiTenant, artifact_id: str, base_model: str) -> str:
    body = request(base_model=base_model, loras=[{"artifact_id": artifact_id}])
    problem = assert_problem(post(client, tenant, body), 422, "artifact_incompatible")
    assert [e["pointer"] for e in problem["errors"]] == ["/loras/0/artifact_id"]
    assert artifact_id in problem["detail"]
    return str(problem["detail"])


def compatible(client: TestClient, tenant: ApiTenant, artifact_id: str, base_model: str) -> None:
    response = post(client, tenant, request(base_model=base_model, loras=[{"artifact_id": artifact_id}]))
    assert response.status_code == 201, response.text


def test_an_sdxl_artifact_on_an_sd_base_is_refused_naming_both(
    api_client: TestClient, bases: Settings, acme: ApiTenant
) -> None:
    sdxl = make_artifact(
        api_client, bases, acme, "lora", "tiny-sdxl", manifest=manifest_on("tiny-sdxl", "sdxl", SDXL_ARCH)
    )
    for base in ("tiny-sd", "tiny-sd-copy", "sd-finetune"):
        detail = incompatible(api_client, acme, sdxl, base)
        assert "'tiny-sdxl' (family sdxl" in detail and f"'{base}' (family sd" in detail, detail
    incompatible(api_client, acme, sdxl, "hub-sd")  # family unknown: only its own base id would do
    compatible(api_client, acme, sdxl, "tiny-sdxl")


def test_same_family_and_architecture_is_allowed_whatever_the_base_id(
    api_client: TestClient, bases: Settings, acme: ApiTenant
) -> None:
    recorded = make_artifact(api_client, bases, acme, "lora", manifest=manifest_on("tiny-sd", "sd", SD_ARCH))
    family_only = make_artifact(api_client, bases, acme, "lora", manifest=manifest_on("tiny-sd", "sd", None))
    bare = make_artifact(api_client, bases, acme, "lora")  # {"files": []}: read from its base id
    for artifact_id in (recorded, family_only, bare):
        for base in ("tiny-sd", "tiny-sd-copy", "sd-finetune"):
            compatible(api_client, acme, artifact_id, base)
        detail = incompatible(api_client, acme, artifact_id, "sd-wide")
        assert "differs in architecture" in detail and "cross-attention 48" in detail, detail


def test_a_base_the_api_cannot_inspect_needs_the_artifacts_own_base(
    api_client: TestClient, bases: Settings, acme: ApiTenant
) -> None:
    on_tiny = make_artifact(api_client, bases, acme, "lora", manifest=manifest_on("tiny-sd", "sd", SD_ARCH))
    detail = incompatible(api_client, acme, on_tiny, "hub-sd")
    assert "cannot be compared" in detail
    on_hub = make_artifact(
        api_client, bases, acme, "lora", "hub-sd", manifest=manifest_on("hub-sd", "sd", None)
    )
    compatible(api_client, acme, on_hub, "hub-sd")
    # Trained on a base the API cannot inspect, with no architecture recorded: the family decides.
    compatible(api_client, acme, on_hub, "sd-finetune")
    sdxl_on_hub = make_artifact(
        api_client, bases, acme, "lora", "hub-sd", manifest=manifest_on("hub-sd", "sdxl", None)
    )
    incompatible(api_client, acme, sdxl_on_hub, "tiny-sd")


# --- the whole path: API, worker, PNGs --------------------------------------------------------------


def test_a_generation_through_the_api_stores_pngs_with_each_images_seed(
    api_client: TestClient,
    bases: Settings,
    acme: ApiTenant,
    tiny_cache: Path,
    trained: dict[str, Path],
) -> None:
    bases.base_models["tiny-sd"] = str(tiny_cache / "tiny-sd")
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
    bases.base_models["tiny-sd-copy"] = str(tiny_cache / "tiny-sd")  # the worker builds nothing

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


# --- the seed's pairing ---------------------------------------------------------------------------


def pairing_items(rng: Any) -> list[Item]:
    """Squares of the tiny world's colours on near-black at random places, each with its mask: the
    ControlNet learns where the shape goes and leaves its colour to the rest of the request."""
    colours = [COLOURS[c] for c in ("red", "green", "yellow", "white")]
    items = []
    for index in range(16):
        image, mask = scene(colours[index % 4], tuple(rng.uniform(0.25, 0.75, size=2)), NEAR_BLACK, rng)
        items.append(Item(image, "a picture", f"{index:02d}.png", mask))
    return items


def reference_iou(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> float:
    """IoU with the mask of the region in the reference's colour: of two colour clusters (2-means),
    the one whose centre is nearer `colour`."""
    pixels = image.reshape(-1, 3)
    centres = np.stack([pixels.mean(0) - pixels.std(0), pixels.mean(0) + pixels.std(0)])
    for _ in range(20):
        labels = np.linalg.norm(pixels[:, None] - centres[None], axis=2).argmin(1)
        centres = np.stack(
            [pixels[labels == k].mean(0) if (labels == k).any() else centres[k] for k in (0, 1)]
        )
    nearest = np.linalg.norm(centres - np.array(colour, dtype=np.float64), axis=1).argmin()
    region = (labels == nearest).reshape(mask.shape)
    return float((region & mask).sum() / max((region | mask).sum(), 1))


def colour_distance(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> float:
    """Distance of the mean colour inside the mask (where the shape should be) to `colour`."""
    return float(np.linalg.norm(image[mask].mean(0) - np.array(colour, dtype=np.float64)))


# The pairing test's scales: the IP-Adapter's and the ControlNet's (see the measurements there).
IP_SCALE, CN_SCALE = 1.5, 4.0


@pytest.mark.slow
def test_the_seeds_pairing_ip_adapter_colour_and_controlnet_layout_at_once(
    worker: Worker, tiny_cache: Path, tmp_path: Path
) -> None:
    base = tiny_cache / "tiny-sd"
    # The recipes of tests/test_ip_adapter.py and tests/test_controlnet.py.
    ip_items = colour_items([MAGENTA, (0, 255, 255), (255, 255, 0), (0, 0, 255)], 2)
    ip = train_artifact(
        base,
        tmp_path / "ip",
        {"method": "ip_adapter"},
        ip_items,
        max_steps=400,
        learning_rate=2e-3,
        batch_size=8,
        lr_scheduler="cosine",
        seed=0,
    )
    cn = train_artifact(
        base,
        tmp_path / "cn",
        {"method": "controlnet"},
        pairing_items(np.random.default_rng(0)),
        max_steps=120,
        learning_rate=1e-3,
        batch_size=4,
        seed=0,
    )
    ip_row, cn_row = worker.upload("ip_adapter", ip), worker.upload("controlnet", cn)
    results: dict[str, list[tuple[float, float]]] = {"base": [], "ip": [], "cn": [], "both": []}
    # Corners: the ControlNet's training squares had their centres in 0.25-0.75.
    for centre in [(0.28, 0.28), (0.72, 0.3), (0.3, 0.72), (0.72, 0.7)]:
        mask_image = scene(MAGENTA, centre, NEAR_BLACK, np.random.default_rng(0))[1]
        mask = np.asarray(mask_image)[..., 0] > 127
        reference, control = Use(ip_row, IP_SCALE, solid(MAGENTA)), Use(cn_row, CN_SCALE, mask_image)
        uses = {"base": [], "ip": [reference], "cn": [control], "both": [reference, control]}
        for name, use in uses.items():
            image = worker.generate(use, prompt=PAIRING_PROMPT, steps=20, seed=0)[0] * 255
            results[name].append((colour_distance(image, mask, MAGENTA), reference_iou(image, mask, MAGENTA)))
    distance = {name: float(np.mean([r[0] for r in rows])) for name, rows in results.items()}
    iou = {name: float(np.mean([r[1] for r in rows])) for name, rows in results.items()}
    # Measured (colour distance inside the mask, IoU) on the tiny-sd an AMD EPYC builds, with 200
    # IP-Adapter steps and scales 1.0 / 2.0: base (332, 0.11), IP-Adapter alone (36, 0.18: everything
    # magenta), ControlNet alone (313, -), both (73, 0.50); over IP-Adapter training seeds 0-2 x
    # ControlNet data seeds 0-3, both stayed within (42-108, 0.37-0.52). The pinned build is not
    # byte-identical on an Intel Xeon (Sapphire Rapids), and on that base the same recipe failed:
    # IP alone (264, 0.19), both (242, 0.24). With 400 steps and scales 1.5 / 4.0 there: base
    # (296, 0.16), IP alone (134, 0.16), ControlNet alone (295, 0.67), both (64, 0.49); it passed at
    # (IP seed, data seed) (0, 0), (1, 0), (0, 2), (1, 3) and failed at (2, 1) (both's IoU 0.26).
    assert distance["both"] < 0.8 * distance["base"], results
    assert iou["both"] > iou["base"] + 0.2, results
    assert min(r[1] for r in results["both"]) > max(r[1] for r in results["base"]), results
    # Each alone does only its half: the ControlNet keeps the base's colours, the IP-Adapter
    # paints everything in the reference colour.
    assert distance["cn"] > 1.3 * distance["both"] and iou["ip"] < iou["both"] - 0.15, results
