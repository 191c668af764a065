"""Never succeed on non-finite weights (issue 19, part 7).

The loop skips a step whose loss or gradient is not finite and counts it (as AMP's GradScaler does),
and stops with `training_diverged` past its bounds (core/training/meter.py); the job layer refuses to
store an artifact holding NaN or inf (`non_finite_artifact`); a personalisation whose prediction is
not finite fails (`non_finite_prediction`). And hyper_lora, which diverged at lr 2e-3 with batch 1
before its pooled features were normalised, stays finite on concept sets other than the tests' own.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.config import Settings
from core.db import session_scope
from core.errors import NonFiniteError
from core.jobs.artifact import write_artifact
from core.jobs.runner import run_training_job
from core.methods.hyper_lora import WEIGHT_NAME, HyperLoraMethod
from core.methods.lora import LoraMethod
from core.models import Artifact, Job
from core.spec.job import JobSpec
from core.storage.artifacts import MANIFEST_NAME
from core.storage.factory import make_storage
from core.training.loop import train
from core.training.meter import MAX_CONSECUTIVE_SKIPS
from core.training.progress import NullHooks, StopTraining
from tests import hyper_lora_world as world
from tests import test_training_loop as shared
from tests.db_fixtures import make_api_tenant

CPU = torch.device("cpu")
one_thread, tiny_cache, load_tiny = shared.one_thread, shared.tiny_cache, shared.load_tiny
LORA_FILE = "pytorch_lora_weights.safetensors"


class Poisoned(LoraMethod):
    """The lora method, with the loss (or only its gradient) made non-finite at chosen 1-based steps:
    what an overflow in the forward or the backward hands the loop."""

    def __init__(self, bad_steps: set[int] | None = None, *, bad_from: int | None = None, part: str = "loss"):
        self.bad_steps, self.bad_from, self.part = bad_steps or set(), bad_from, part
        self.steps = 0  # forwards so far: one per step (no accumulation, no compiling here)
        self.trainable: Any = None

    def is_bad(self, step: int) -> bool:
        return step in self.bad_steps or (self.bad_from is not None and step >= self.bad_from)

    def build(self, base: Any, params: Any, training: Any, *, device: torch.device) -> Any:
        trainable = super().build(base, params, training, device=device)
        forward = trainable.forward

        def poisoned(batch: Any) -> torch.Tensor:
            loss = forward(batch)
            self.steps += 1
            if self.is_bad(self.steps):
                if self.part == "loss":
                    return loss * float("nan")
                loss.register_hook(lambda grad: grad * float("inf"))  # a finite loss, inf gradients
            return loss

        trainable.forward = poisoned
        self.trainable = trainable
        return trainable


class Snapshots(NullHooks):
    """The trainable weights after every step (the loop reports every step)."""

    def __init__(self, method: Poisoned) -> None:
        super().__init__(report_every=1)
        self.method = method
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        state = self.method.trainable.trainable_state()
        self.after[step] = {k: v.detach().clone() for k, v in state.items()}


def lora_spec(steps: int, optimizer: str = "adamw") -> JobSpec:
    return JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "lora", "rank": 2},
        training={"max_steps": steps, "learning_rate": 1e-2, "optimizer": optimizer, "compile": "off"},
    )


def run_poisoned(method: Poisoned, steps: int, cache: Path, workdir: Path, **kw: Any) -> Any:
    hooks = Snapshots(method)
    result = train(
        method=method,
        spec=lora_spec(steps, **kw),
        base=load_tiny(cache),
        items=shared.items_for_loop(),
        workdir=workdir,
        hooks=hooks,
        device=CPU,
    )
    return result, hooks


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])  # fused: skipped on device; else a sync
@pytest.mark.parametrize("part", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_counted(
    tiny_cache: Path, tmp_path: Path, part: str, optimizer: str
) -> None:
    method = Poisoned({2, 4}, part=part)
    result, hooks = run_poisoned(method, 5, tiny_cache, tmp_path, optimizer=optimizer)
    after = hooks.after
    # The poisoned steps left the weights as they were; the finite ones around them trained.
    assert same(after[2], after[1]) and same(after[4], after[3])
    assert not same(after[3], after[2]) and not same(after[5], after[4])
    assert result.skipped_steps == 2
    assert all(bool(torch.isfinite(v).all()) for v in after[5].values())
    weights = load_file(result.artifact_dir / LORA_FILE)
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    # The loss curve and the final loss come from the applied steps only (a skipped step's loss,
    # even a finite one, belongs to weights that did not take it).
    assert math.isfinite(result.final_loss)
    assert [step for step, _ in result.loss_history] == [1, 3, 5]
    assert all(math.isfinite(loss) for _, loss in result.loss_history)


def test_skipped_steps_in_a_row_stop_training_as_diverged(tiny_cache: Path, tmp_path: Path) -> None:
    method = Poisoned(bad_from=3, part="gradient")
    with pytest.raises(NonFiniteError) as raised:
        run_poisoned(method, 40, tiny_cache, tmp_path)
    assert raised.value.code == "training_diverged"
    # Steps 3..12 are the ten in a row; it stops there instead of running to step 40.
    assert method.steps == 2 + MAX_CONSECUTIVE_SKIPS
    assert "10 of 12 optimizer steps up to step 12" in str(raised.value)
    assert f"{MAX_CONSECUTIVE_SKIPS} in a row" in str(raised.value)
    assert not (tmp_path / "artifact").exists()  # nothing was saved


def test_too_many_skipped_steps_in_all_stop_training(tiny_cache: Path, tmp_path: Path) -> None:
    # Every other step: never ten in a row, but past max(10, 5 % of 40) skipped steps in all.
    method = Poisoned(set(range(2, 41, 2)))
    with pytest.raises(NonFiniteError, match="11 of 22 optimizer steps up to step 22") as raised:
        run_poisoned(method, 40, tiny_cache, tmp_path)
    assert raised.value.code == "training_diverged"


# --- the job layer -----------------------------------------------------------------------------


def test_an_artifact_with_a_nan_tensor_is_not_stored(tiny_cache: Path, tmp_path: Path) -> None:
    method, base = LoraMethod(), load_tiny(tiny_cache)
    spec = lora_spec(1)
    result = train(
        method=method,
        spec=spec,
        base=base,
        items=shared.items_for_loop(),
        workdir=tmp_path,
        hooks=NullHooks(),
        device=CPU,
    )
    path = result.artifact_dir / LORA_FILE
    weights = load_file(path)
    key = sorted(k for k in weights if "lora_B" in k)[3]
    weights[key][0, 0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError) as raised:
        write_artifact(result, method=method, spec=spec, base=base, name="x", hooks=NullHooks())
    assert raised.value.code == "non_finite_artifact"
    assert f"1 of {len(weights)} tensors" in str(raised.value) and key in str(raised.value)
    assert not (result.artifact_dir / MANIFEST_NAME).exists()  # no manifest, no artifact
    assert not (result.artifact_dir / "exports").exists()


def _concepts_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for item in world.concept_dataset(seed=0)[: 5 * world.IMAGES_PER_CONCEPT]:
            png = io.BytesIO()
            item.image.save(png, format="PNG")
            archive.writestr(item.name, png.getvalue())
    return buffer.getvalue()


def _run_job(client: TestClient, settings: Settings, headers: dict[str, str], body: dict) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    run_training_job(job_id=job_id, settings=settings, storage=make_storage(settings), worker_id="w")
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def _stored_files(settings: Settings, job_id: str) -> list[Path]:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        tenant = job.tenant_id
    root = Path(settings.home) / "storage"
    return [p for p in root.rglob("*") if p.is_file() and job_id in str(p) and tenant in str(p)]


HYPER = {"method": "hyper_lora", "hidden_dim": 32, "basis_size": 4}


def test_a_diverging_job_fails_and_stores_no_artifact(
    api_client: TestClient, api_settings: Settings, model_cache: Path
) -> None:
    tenant = make_api_tenant(api_settings, "diverging")
    files = [("files", ("concepts.zip", _concepts_zip(), "application/zip"))]
    response = api_client.post("/v1/datasets", files=files, headers=tenant.headers)
    assert response.status_code == 201, response.text
    settings = api_settings.model_copy(update={"model_cache": model_cache})
    # No injected NaN: lr 1.0 drives this hyper_lora's gradients to inf within a few steps (its
    # predicted LoRA grows past what the UNet's activations hold), then every step after.
    body = {
        "base_model": "tiny-sd",
        "dataset_id": response.json()["id"],
        "params": HYPER,
        "training": {"max_steps": 40, "learning_rate": 1.0, "batch_size": 4},
    }
    job = _run_job(api_client, settings, tenant.headers, body)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "training_diverged", job["error"]
    assert "non-finite loss or gradient" in job["error"]["message"]
    assert job["artifact_id"] is None
    with session_scope(settings.database_url) as session:
        assert session.query(Artifact).filter_by(tenant_id=tenant.tenant_id).count() == 0
    assert not [p for p in _stored_files(settings, job["id"]) if "attempt-" in str(p)]


def test_a_personalisation_with_a_non_finite_prediction_fails(
    api_client: TestClient, api_settings: Settings, model_cache: Path
) -> None:
    tenant = make_api_tenant(api_settings, "personal")
    files = [("files", ("concepts.zip", _concepts_zip(), "application/zip"))]
    dataset = api_client.post("/v1/datasets", files=files, headers=tenant.headers).json()
    settings = api_settings.model_copy(update={"model_cache": model_cache})
    hyper_body = {
        "base_model": "tiny-sd",
        "dataset_id": dataset["id"],
        "params": HYPER,
        "training": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4},
    }
    hyper = _run_job(api_client, settings, tenant.headers, hyper_body)
    assert hyper["status"] == "succeeded", hyper["error"]
    # A hyper_lora stored before non-finite artifacts were refused: its B basis went NaN.
    with session_scope(settings.database_url) as session:
        artifact = session.get(Artifact, hyper["artifact_id"])
        assert artifact is not None
        prefix = artifact.storage_prefix
    stored = Path(settings.home) / "storage" / prefix / WEIGHT_NAME
    assert stored.exists(), stored
    with safe_open(stored, "pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    for key in state:
        if key.startswith("basis_b."):
            state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, stored, metadata=metadata)

    buffer = io.BytesIO()
    world.concept_images(world.HELD_OUT["magenta"], 1, seed=1)[0].save(buffer, format="PNG")
    image = api_client.post(
        "/v1/images", files={"file": ("ref.png", buffer.getvalue(), "image/png")}, headers=tenant.headers
    )
    assert image.status_code == 201, image.text
    body = {
        "base_model": "tiny-sd",
        "params": {"method": "lora", "rank": 4},
        "training": {"max_steps": 0},
        "init_from": {"hyper_lora": hyper["artifact_id"], "images": [image.json()["id"]]},
    }
    job = _run_job(api_client, settings, tenant.headers, body)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "non_finite_prediction", job["error"]
    assert "train the hyper_lora again" in job["error"]["message"]
    assert job["artifact_id"] is None


# --- hyper_lora's stability ----------------------------------------------------------------------


class Measured(NullHooks):
    """Reports every step, and at `stop_at` measures the predicted LoRAs and ends the run."""

    def __init__(self, method: Any, stop_at: int, references: list[Image.Image]) -> None:
        super().__init__(report_every=1)
        self.method, self.stop_at, self.references = method, stop_at, references
        self.losses: dict[int, float] = {}
        self.largest_delta = math.nan

    def progress(self, *, step: int, total: int, loss: float, images_per_s: float) -> None:
        self.losses[step] = loss
        if step < self.stop_at:
            return
        trainable = self.method.trainable
        with torch.no_grad():
            tokens = trainable.encoder.tokens(self.references, CPU, trainable.config.features)
            factors = trainable.network(tokens)
        # The largest entry of any predicted B A (a LoRA's weight change before its scale, 1 here).
        self.largest_delta = max(float((b @ a).abs().max()) for a, b in factors.values())
        raise StopTraining("measured")


class Kept(HyperLoraMethod):
    trainable: Any = None

    def build(self, base: Any, params: Any, training: Any, *, device: torch.device) -> Any:
        self.trainable = super().build(base, params, training, device=device)
        return self.trainable


STABLE_STEPS = 150


@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 7])
def test_hyper_lora_stays_a_lora_at_the_documented_lr_on_other_concept_sets(
    tiny_cache: Path, tmp_path: Path, seed: int
) -> None:
    """The settings the held-out tests document (rank 4, attention+conv+ff, lr 2e-3, cosine over
    1000 steps) at batch 1, the API's default, on colours uniform over the RGB cube (not the
    tests' own sets) with +-10 noise: the reported run's world. The full run takes 5-10 min on
    this machine's CPU, too slow for the suite, so it stops at step 150, where the damage already
    shows. Measured before the fix (tiny-sd, CPU): mean loss of steps 51-150 0.754 and 0.802 at
    seeds 5 and 7, the largest entry of a predicted B A 159 and 124 (the UNet's output was noise),
    and seed 5 went NaN at step 258. With the fix: 0.263 and 0.239, 0.51 and 0.35; the full 1000
    steps at seed 5 stay finite, no step skipped, the loss falling to 0.15 over steps 750-1000."""
    items = world.concept_dataset(seed, uniform=True, noise=10)
    spec = JobSpec(
        base_model="tiny-sd",
        dataset_id="ds",
        params={"method": "hyper_lora", "rank": 4, "targets": world.TARGETS, "instance_prompt": world.PROMPT},
        training={
            "max_steps": world.HYPER_STEPS,
            "learning_rate": world.HYPER_LR,
            "lr_scheduler": "cosine",
            "batch_size": 1,
            "seed": seed,
        },
    )
    method = Kept()
    hooks = Measured(method, STABLE_STEPS, [item.image for item in items[::45]])
    with pytest.raises(StopTraining):
        train(
            method=method,
            spec=spec,
            base=load_tiny(tiny_cache),
            items=items,
            workdir=tmp_path,
            hooks=hooks,
            device=CPU,
        )
    assert len(hooks.losses) == STABLE_STEPS and all(math.isfinite(v) for v in hooks.losses.values())
    late = [hooks.losses[step] for step in range(51, STABLE_STEPS + 1)]
    mean, largest = sum(late) / len(late), hooks.largest_delta
    print(f"\nseed {seed}: mean loss of steps 51-{STABLE_STEPS} {mean:.3f}, largest B A {largest:.2f}")
    assert mean < 0.4, mean  # the UNet still denoises: the predicted LoRAs have not taken it over
    assert largest < 2.0, largest
