"""The captured training step (training.compile): one graph per batch shape and no graph breaks for
every method on the SD and SDXL UNets, the same losses as eager, and "auto" compiling only when the
job repays it. Timings live in bench/compiled_step.py, never here.

Most cases compile with dynamo's "eager" backend (ATELIER_COMPILE_BACKEND): graph capture and
graph breaks are decided by dynamo before any backend runs, so the counts are the ones inductor
sees, in seconds instead of minutes of code generation.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.train_throughput import TimingHooks, method_params
from bench.workload import make_items
from core.config import Settings
from core.jobs.artifact import TrainedArtifact, train_artifact
from core.spec.job import JobSpec
from core.training import step as step_module

CPU = torch.device("cpu")
METHODS = ("lora", "dreambooth", "textual_inversion", "hypernetwork", "controlnet", "ip_adapter")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bases(model_cache: Path):
    from core.bases.loader import load_base

    def load(model_id: str) -> Any:
        return load_base(model_id, settings=Settings(model_cache=model_cache), device="cpu")

    return load


def run(load, model_id: str, method: str, *, compile: str, steps: int, images: int = 8) -> TrainedArtifact:
    """`steps` steps of `method` at batch 2 on a fresh copy of the base: one batch shape."""
    base = load(model_id)
    items = make_items(images, base.resolution, 0, conditioning=method == "controlnet")
    dreambooth = method == "dreambooth"
    class_images = [item.image for item in make_items(4, base.resolution, 1)] if dreambooth else []
    args = type("Args", (), {"rank": 4, "class_images": len(class_images)})()
    spec = JobSpec(
        base_model=model_id,
        dataset_id="test",
        params=method_params(method, base, args),
        training={"max_steps": steps, "batch_size": 2, "learning_rate": 1e-3, "seed": 3, "compile": compile},
    )
    with tempfile.TemporaryDirectory() as workdir:
        hooks = TimingHooks(1, class_images)
        return train_artifact(
            spec=spec, base=base, items=items, workdir=Path(workdir), hooks=hooks, device=CPU
        )


def losses(result: TrainedArtifact) -> list[float]:
    return [loss for _, loss in result.loss_history]


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_compiles_to_one_graph_without_breaks_and_trains_as_eager(
    bases, monkeypatch: pytest.MonkeyPatch, model_id: str, method: str
) -> None:
    monkeypatch.setenv("ATELIER_COMPILE_BACKEND", "eager")
    compiled = run(bases, model_id, method, compile="on", steps=3)
    stats = compiled.compile
    assert stats["enabled"] and stats["compiled_at_step"] == 1, stats
    assert stats["break_reasons"] == [] and stats["graph_breaks"] == 0, stats["break_reasons"]
    assert stats["shapes"] == 1 and stats["graphs"] == 1, stats
    eager = run(bases, model_id, method, compile="off", steps=3)
    assert eager.compile["enabled"] is False
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5, abs=1e-7)


def test_cpu_compile_runs_aot_autograd_and_matches_eager_over_twenty_steps(bases, monkeypatch) -> None:
    """The CPU default (AOTAutograd's forward and backward graphs, no inductor: see
    core.training.step.backend_and_mode) keeps the eager loss curve and writes the artifact."""
    monkeypatch.delenv("ATELIER_COMPILE_BACKEND", raising=False)
    compiled = run(bases, "tiny-sd", "lora", compile="on", steps=20)
    stats = compiled.compile
    assert stats["backend"] == "aot_eager" and stats["graph_breaks"] == 0 and stats["compile_s"] > 0
    eager = run(bases, "tiny-sd", "lora", compile="off", steps=20)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4, abs=1e-6)
    assert compiled.files == ["pytorch_lora_weights.safetensors", "manifest.json"]


def test_auto_compiles_only_when_the_remaining_steps_repay_it(bases, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(step_module, "_measured_compile_s", {})
    plain = run(bases, "tiny-sd", "lora", compile="auto", steps=12)
    assert plain.compile["enabled"] is False and "cuda only" in plain.compile["reason"]
    monkeypatch.setattr(step_module, "AUTO_DEVICES", ("cuda", "cpu"))  # decide here as on a GPU

    short = run(bases, "tiny-sd", "lora", compile="auto", steps=3)
    assert short.compile["enabled"] is False and "too few steps" in short.compile["reason"]

    # Compiling priced at an hour: 12 steps of a tiny model never repay it.
    monkeypatch.setattr(step_module, "DEFAULT_COMPILE_S", {"cpu": 3600.0, "cuda": 3600.0})
    costly = run(bases, "tiny-sd", "lora", compile="auto", steps=12)
    assert costly.compile["enabled"] is False and "does not repay" in costly.compile["reason"]
    assert costly.compile["eager_step_s"] > 0

    # Priced at nothing: after the warm-up step and three timed eager steps, step 5 on runs compiled.
    monkeypatch.setattr(step_module, "DEFAULT_COMPILE_S", {"cpu": 0.0, "cuda": 0.0})
    cheap = run(bases, "tiny-sd", "lora", compile="auto", steps=12)
    assert cheap.compile["enabled"] and cheap.compile["compiled_at_step"] == 5, cheap.compile
    assert cheap.compile["graph_breaks"] == 0
    # Switching mid-run changes nothing the optimizer sees: the curve is the eager one.
    assert losses(cheap) == pytest.approx(losses(costly), rel=1e-5, abs=1e-7)
    # What this worker measured now prices the next job of the same method and base.
    assert step_module._measured_compile_s


def test_a_compile_failure_falls_back_to_eager(bases, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_COMPILE_BACKEND", "no_such_backend")
    result = run(bases, "tiny-sd", "lora", compile="on", steps=2)
    assert result.compile["enabled"] is False and result.compile["reason"].startswith("compile failed")
    assert all(math.isfinite(x) for x in losses(result))


def test_compile_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="compile"):
        JobSpec(base_model="tiny-sd", dataset_id="d", params={"method": "lora"}, training={"compile": "yes"})
