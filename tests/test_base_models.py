"""Base models: the torch-free allow-list, materialising every kind of source, and the built-in tiny
bases, which must be real models (a VAE that draws colours, a UNet that follows its prompt), not
random weights that any assertion would pass on.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.bases.allow_list import (
    BaseModelNotAllowed,
    BaseModelUnavailable,
    get_base_model_info,
    list_base_models,
)
from core.config import Settings


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # The tiny models are latency-bound; on a shared 2-core machine extra threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mean_rgb(images: list[Any], box: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return pixels[:, box[0], box[1]].reshape(-1, 3).mean(axis=0)


def generate(pipe: Any, prompt: str, n: int = 4, steps: int = 12) -> list[Any]:
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe([prompt] * n, num_inference_steps=steps, generator=generator).images


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd: Settings) -> Any:
    from core.bases.loader import load_pipeline

    pipe = load_pipeline("tiny-sd", settings=tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the allow-list, no torch ------------------------------------------------------------------


def test_api_side_never_imports_torch() -> None:
    code = (
        "import sys, core.bases.allow_list as b, core.config as c;"
        "b.list_base_models(c.get_settings());"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_unknown_id_is_not_allowed() -> None:
    settings = Settings(base_models={"tiny-sd": "builtin:tiny-sd"})
    with pytest.raises(BaseModelNotAllowed, match="tiny-sd") as caught:
        get_base_model_info("sd-turbo", settings)
    assert caught.value.model_id == "sd-turbo"


def test_unknown_id_is_refused_before_any_loading(tmp_path: Path) -> None:
    from core.bases.loader import load_base

    with pytest.raises(BaseModelNotAllowed):
        load_base("../../etc", settings=Settings(model_cache=tmp_path))
    assert not any(tmp_path.iterdir())


def test_list_describes_builtins_and_local_folders(tmp_path: Path) -> None:
    folder = tmp_path / "xl"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 128}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    settings = Settings(
        base_models={"tiny-sd": "builtin:tiny-sd", "mine": str(folder), "sd15": "hf:org/sd15"}
    )
    public = {m.id: m.to_public() for m in list_base_models(settings)}
    assert public["tiny-sd"] == {
        "id": "tiny-sd",
        "object": "base_model",
        "family": "sd",
        "resolution": 32,
        "builtin": True,
        "source_kind": "builtin",
    }
    assert (public["mine"]["family"], public["mine"]["resolution"]) == ("sdxl", 1024)
    assert (public["sd15"]["family"], public["sd15"]["source_kind"]) == (None, "hf")
    assert str(folder) not in json.dumps(public)  # server paths stay private


# --- materialising sources ---------------------------------------------------------------------


def slow_copy(source: Path, calls: Path, prefix: str, folder: Path) -> None:
    with calls.open("a") as handle:
        handle.write(prefix + "\n")
    time.sleep(0.5)  # long enough for a racing process to arrive while this one holds the lock
    shutil.copytree(source, folder, dirs_exist_ok=True)


def race(cache: str, source: str, calls: str) -> str:
    from functools import partial

    from core.bases.loader import ensure_local

    settings = Settings(model_cache=cache, base_models={"remote": "storage:bases/tiny-sd"})
    fetch = partial(slow_copy, Path(source), Path(calls))
    return str(ensure_local("remote", settings=settings, fetch_prefix=fetch))


def test_storage_source_is_fetched_once_across_processes(
    model_cache: Path, tiny_sd: Settings, tmp_path: Path
) -> None:
    from core.bases.loader import ensure_local, load_base

    built = ensure_local("tiny-sd", settings=tiny_sd)
    calls = tmp_path / "calls.txt"
    args = (str(tmp_path / "cache"), str(built), str(calls))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(race, [args, args])
    assert paths[0] == paths[1]
    assert calls.read_text().splitlines() == ["bases/tiny-sd"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith(".")]

    settings = Settings(model_cache=tmp_path / "cache", base_models={"remote": "storage:bases/tiny-sd"})
    base = load_base("remote", settings=settings, fetch_prefix=lambda prefix, folder: pytest.fail())
    assert (base.family, base.path) == ("sd", Path(paths[0]))


def test_storage_source_needs_a_fetcher(tmp_path: Path) -> None:
    from core.bases.loader import ensure_local

    settings = Settings(model_cache=tmp_path, base_models={"remote": "storage:bases/x"})
    with pytest.raises(BaseModelUnavailable, match="fetch_prefix"):
        ensure_local("remote", settings=settings)


def test_a_failed_fetch_leaves_nothing_behind(tmp_path: Path) -> None:
    from core.bases.loader import ensure_local

    def broken(prefix: str, folder: Path) -> None:
        (folder / "model_index.json").write_text("{}")
        raise ConnectionError("storage went away")

    settings = Settings(model_cache=tmp_path, base_models={"remote": "storage:bases/x"})
    with pytest.raises(ConnectionError):
        ensure_local("remote", settings=settings, fetch_prefix=broken)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_local_folder_source(tiny_sd: Settings, tmp_path: Path) -> None:
    from core.bases.loader import ensure_local

    built = ensure_local("tiny-sd", settings=tiny_sd)
    settings = Settings(model_cache=tmp_path, base_models={"mine": str(built), "gone": str(tmp_path / "x")})
    assert ensure_local("mine", settings=settings) == built
    assert get_base_model_info("mine", settings).family == "sd"
    with pytest.raises(BaseModelUnavailable, match=r"model_index\.json"):
        ensure_local("gone", settings=settings)


# --- the built-in tiny bases -------------------------------------------------------------------


def test_tiny_sd_loads_as_a_diffusers_folder(tiny_sd: Settings) -> None:
    from core.bases.loader import load_base

    base = load_base("tiny-sd", settings=tiny_sd)
    assert (base.family, base.prediction_type, base.resolution) == ("sd", "v_prediction", 32)
    assert base.tokenizer_2 is None and base.text_encoder_2 is None
    assert type(base.noise_scheduler).__name__ == "DDPMScheduler"
    assert (base.path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (base.path / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"
    assert base.vae.config.latent_channels == 4 and len(base.vae.config.block_out_channels) == 2


def test_offline_tokenizer(tiny_sd: Settings) -> None:
    from transformers import CLIPTokenizer

    from core.bases.loader import ensure_local

    folder = ensure_local("tiny-sd", settings=tiny_sd) / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    config = json.loads((folder.parent / "text_encoder" / "config.json").read_text())
    ids = tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == config["bos_token_id"] == tokenizer.bos_token_id
    assert ids[-1] == config["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle on a blue background"
    assert tokenizer.add_tokens(["<sks>"]) == 1
    assert tokenizer("a photo of <sks>").input_ids[-2] == len(tokenizer) - 1 == config["vocab_size"]


def test_vae_reconstructs_colours(tiny_sd: Settings) -> None:
    from core.bases.loader import load_base

    vae = load_base("tiny-sd", settings=tiny_sd).vae
    for colour in [(225, 35, 35), (255, 0, 255), (255, 140, 0), (35, 70, 225)]:
        pixels = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 32, 32)
        with torch.no_grad():
            latents = vae.encode(pixels / 127.5 - 1).latent_dist.mean
            decoded = vae.decode(latents).sample.clamp(-1, 1)
        rgb = ((decoded.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
        assert np.linalg.norm(rgb - np.array(colour)) < 40, (colour, rgb.round())


def test_unet_depends_on_the_prompt(tiny_sd: Settings) -> None:
    from core.bases.loader import load_base

    base = load_base("tiny-sd", settings=tiny_sd)
    ids = base.tokenizer(
        ["a solid red image", "a solid blue image"],
        padding="max_length",
        max_length=base.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = base.unet(noisy, torch.tensor([800, 800]), base.text_encoder(ids)[0]).sample
    assert (out[0] - out[1]).abs().mean() > 0.2 * out.abs().mean()


def test_tiny_sd_follows_colour_prompts(sd_pipe: Any) -> None:
    red, blue = (
        mean_rgb(generate(sd_pipe, "a solid red image")),
        mean_rgb(generate(sd_pipe, "a solid blue image")),
    )
    assert red[0] > blue[0] + 80 and blue[2] > red[2] + 80, (red, blue)
    assert red[0] > red[1] + 80 and blue[2] > blue[1] + 80, (red, blue)


def test_tiny_sd_draws_the_shape_colour_in_the_middle(sd_pipe: Any) -> None:
    images = generate(sd_pipe, "a red circle on a blue background")
    centre, corner = (
        mean_rgb(images, (slice(12, 20), slice(12, 20))),
        mean_rgb(images, (slice(0, 5), slice(0, 5))),
    )
    assert centre[0] > centre[2] + 60, centre  # red circle in the middle
    assert corner[2] > corner[0] + 60, corner  # blue around it


def test_tiny_sdxl_generates_through_the_sdxl_pipeline(model_cache: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from core.bases.loader import load_base, load_pipeline

    settings = Settings(model_cache=model_cache)
    pipe = load_pipeline("tiny-sdxl", settings=settings)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    images = generate(pipe, "a red circle on a blue background", n=2)
    pixels = np.asarray(images[0], dtype=np.float32)
    assert pixels.shape == (32, 32, 3) and pixels.std() > 20

    base = load_base("tiny-sdxl", settings=settings)
    assert (base.family, base.prediction_type) == ("sdxl", "v_prediction")
    assert base.unet.config.addition_embed_type == "text_time"
    assert base.unet.config.cross_attention_dim == (
        base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    )


def test_build_runs_on_the_pinned_kernels() -> None:
    """Every x86 machine builds the same base only if the build's child really uses the AVX2
    kernels (core/bases/tiny/build.py says why); elsewhere nothing is pinned."""
    import subprocess
    import sys

    from core.bases.tiny.build import _x86_with_avx2, pinned_env

    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=pinned_env(), capture_output=True, text=True, check=True
    )
    if _x86_with_avx2():
        assert out.stdout.strip() == "AVX2"
        assert pinned_env()["MKL_CBWR"] == "AVX2,STRICT"


def test_the_shipped_bases_are_the_files_their_checksums_and_the_readme_name() -> None:
    """Every machine loads the same bytes: each shipped folder matches its SHA256SUMS, and the
    README's table of checksums is the same list."""
    from cli.tiny import file_sums, read_sums
    from core.bases.tiny import NAMES, shipped_folder

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in NAMES:
        folder = shipped_folder(name)
        sums = read_sums(folder)
        assert file_sums(folder) == sums, name
        for weights in (f for f in sums if f.endswith(".safetensors")):
            assert f"{sums[weights]}  {name}/{weights}" in readme, f"README lacks {name}/{weights}"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATELIER_TEST_RECIPE") != "1",
    reason="opt-in (ATELIER_TEST_RECIPE=1, about 3 minutes): the bytes are the AMD EPYC's, where the "
    "shipped bases were built; even on pinned kernels an Intel Xeon builds a different base",
)
def test_the_recipe_rebuilds_the_shipped_base_byte_for_byte(tmp_path: Path) -> None:
    """`atelier tiny build` is the recipe of what ships: on the machine kind that built them, it
    makes the same bytes again (README "Built-in bases")."""
    from cli.tiny import file_sums, read_sums
    from core.bases.tiny import shipped_folder
    from core.bases.tiny.build import build_pinned

    build_pinned("tiny-sd", tmp_path)
    assert file_sums(tmp_path) == read_sums(shipped_folder("tiny-sd"))
