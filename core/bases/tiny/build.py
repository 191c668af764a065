"""Build a tiny base as an ordinary diffusers pipeline folder (save_pretrained, safetensors).

Nothing here knows about caches or locks (core/bases/loader.py owns those): `build(name, out_dir)`
writes a complete folder into an empty `out_dir`, the same bytes for the same inputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from core.bases.tiny import NAMES, components, pretrain

log = logging.getLogger(__name__)


IMAGE_ENCODER = "image_encoder"
SEED = 1234


@contextmanager
def _build_context(seed: int) -> Iterator[None]:
    """Seeded, deterministic and single-threaded inside; the caller's settings untouched outside.

    One thread: these models are so small that intra-op threads mostly synchronise, and on a
    shared 2-core machine two threads ran 3x slower than one.
    """
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def build(
    name: str,
    out_dir: Path,
    *,
    vae_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Build `name` into `out_dir`. tiny-sdxl reuses the VAE of a built tiny-sd at `vae_dir` (the
    same latent space, and half the build time). Returns timings in seconds. `on_progress(done,
    total)` counts pre-training steps (the VAE's, unless reused, then the UNet's): nearly all the time."""
    if name not in NAMES:
        raise ValueError(f"unknown builtin base {name!r}; known: {', '.join(NAMES)}")
    started = time.perf_counter()
    vae_steps = pretrain.VAE_STEPS if vae_dir is None else 0
    total = vae_steps + pretrain.UNET_STEPS

    def stepped(offset: int) -> Callable[[int], None] | None:
        report = on_progress
        return None if report is None else lambda done: report(offset + done, total)

    if on_progress is not None:
        on_progress(0, total)
    # Grad on even if the caller (an inference worker) loads bases under no_grad/inference_mode.
    with _build_context(SEED), torch.inference_mode(False), torch.enable_grad():
        vae = _vae(vae_dir, stepped(0))
        vae_s = time.perf_counter() - started
        unet_step = stepped(vae_steps)
        pipe = _sd_pipeline(vae, unet_step) if name == "tiny-sd" else _sdxl_pipeline(vae, unet_step)
        encoder = components.image_encoder()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Beside the pipeline, not in model_index.json: real bases get theirs from the IP-Adapter
    # release (h94/IP-Adapter's `image_encoder/`), and a plain pipeline load should not carry it.
    encoder.save_pretrained(out_dir / IMAGE_ENCODER, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        if (out_dir / folder).exists():
            # Keep the canonical vocab.json + merges.txt form (any transformers version, slow or
            # fast tokenizer, loads it) rather than only the tokenizer.json save_pretrained writes.
            shutil.rmtree(out_dir / folder)
            components.write_tokenizer(out_dir / folder)
    timings = {"vae_s": round(vae_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    log.info("built tiny base", extra={"base_model": name, **timings})
    return timings


def _vae(vae_dir: Path | None, on_step: Callable[[int], None] | None) -> AutoencoderKL:
    if vae_dir is not None:
        return AutoencoderKL.from_pretrained(vae_dir)
    vae = components.vae()
    pretrain.train_vae(vae, seed=SEED, on_step=on_step)
    return vae


def _scaled_latents(vae: AutoencoderKL) -> tuple[torch.Tensor, list[str]]:
    latents, captions = pretrain.world_latents(vae, seed=SEED + 1)
    # Unit-variance latents are what the noise schedule assumes; diffusers reads the factor back.
    scale = round(1.0 / latents.std().item(), 5)
    vae.register_to_config(scaling_factor=scale)
    return latents * scale, captions


def _tokenizer() -> components.CLIPTokenizer:
    # Loaded from the files we ship, so pre-training tokenizes exactly as later loads will.
    with tempfile.TemporaryDirectory() as scratch:
        components.write_tokenizer(Path(scratch))
        return components.load_tokenizer(Path(scratch))


def _sd_pipeline(vae: AutoencoderKL, on_step: Callable[[int], None] | None) -> StableDiffusionPipeline:
    latents, captions = _scaled_latents(vae)
    tokenizer, encoder, unet = _tokenizer(), components.text_encoder(), components.unet_sd()
    scheduler = components.scheduler()
    loss = pretrain.train_unet(
        unet,
        pretrain.sd_text(tokenizer, encoder),
        latents,
        captions,
        DDPMScheduler.from_config(scheduler.config),
        seed=SEED + 2,
        on_step=on_step,
    )
    log.info("tiny-sd unet pre-trained", extra={"loss": round(loss, 4)})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(vae: AutoencoderKL, on_step: Callable[[int], None] | None) -> StableDiffusionXLPipeline:
    latents, captions = _scaled_latents(vae)
    tokenizers = [_tokenizer(), _tokenizer()]
    encoders = components.sdxl_text_encoders()
    unet, scheduler = components.unet_sdxl(), components.scheduler()
    loss = pretrain.train_unet(
        unet,
        pretrain.sdxl_text(tokenizers, list(encoders)),
        latents,
        captions,
        DDPMScheduler.from_config(scheduler.config),
        seed=SEED + 3,
        on_step=on_step,
    )
    log.info("tiny-sdxl unet pre-trained", extra={"loss": round(loss, 4)})
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    )


# --- one base on every machine -------------------------------------------------------------------------
# Pre-training is chaotic: CPU kernels that round differently (AVX-512 against AVX2 paths in ATen,
# MKL and oneDNN) grow into different bases after hundreds of steps. Measured: the same recipe built
# a base that follows colour prompts on one machine and one that hardly reads its prompt on another.
# So the build runs in a child process whose kernels are pinned to the AVX2 paths, which every
# x86-64 machine we run on has, and every machine builds the same base. Elsewhere (ARM) nothing is
# pinned: the base is then that machine's own.
PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "MKL_CBWR": "AVX2,STRICT",  # MKL's conditional bitwise reproducibility (matmuls)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # convolutions
    "OMP_NUM_THREADS": "1",  # the build is single-threaded anyway (_build_context)
    "MKL_NUM_THREADS": "1",
}
_PROGRESS, _TIMINGS = "atelier-build-progress ", "atelier-build-timings "


def _x86_with_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def pinned_env() -> dict[str, str]:
    """This process's environment with the kernels pinned (PINNED_KERNELS) where the CPU allows."""
    env = {**os.environ, **(PINNED_KERNELS if _x86_with_avx2() else {})}
    root = Path(__file__).resolve().parents[3]  # the child imports this package as the parent does
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def build_pinned(
    name: str,
    out_dir: Path,
    *,
    vae_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """`build` in a child process with PINNED_KERNELS (on x86 with AVX2): the same base, byte for
    byte, whichever CPU builds it. Progress comes back over the child's stdout."""
    command = [sys.executable, "-m", "core.bases.tiny.build", name, str(out_dir)]
    if vae_dir is not None:
        command += ["--vae-dir", str(vae_dir)]
    timings: dict[str, float] = {}
    child = subprocess.Popen(command, env=pinned_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(_PROGRESS) and on_progress is not None:
                done, total = (int(n) for n in line[len(_PROGRESS) :].split())
                on_progress(done, total)
            elif line.startswith(_TIMINGS):
                timings = json.loads(line[len(_TIMINGS) :])
        if child.wait() != 0 or not timings:
            raise RuntimeError(f"building the built-in base {name!r} failed (exit {child.returncode})")
    finally:
        if child.poll() is None:  # interrupted: the child must not outlive us
            child.kill()
            child.wait()
    return timings


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build one built-in tiny base into an empty folder.")
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vae-dir", type=Path)
    args = parser.parse_args(argv)

    def report(done: int, total: int) -> None:
        print(f"{_PROGRESS}{done} {total}", flush=True)

    timings = build(args.name, args.out_dir, vae_dir=args.vae_dir, on_progress=report)
    print(f"{_TIMINGS}{json.dumps(timings)}", flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
