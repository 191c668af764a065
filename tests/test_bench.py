"""The throughput bench runs for every method: both loops train a step or two on tiny-sd and the
report carries both rates and their ratio. Timings themselves are not asserted (shared machines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.reference_loops import LOOPS
from bench.train_throughput import main
from tests import test_training_loop as shared

one_thread = shared.one_thread  # autouse, module scope: torch on one thread
FIELDS = {"method", "model", "device", "batch", "resolution", "reference_img_s", "atelier_img_s", "ratio"}


@pytest.mark.parametrize("method", sorted(LOOPS))
def test_bench_reports_both_rates(method: str, model_cache: Path, capsys: pytest.CaptureFixture) -> None:
    report = main(
        [
            *("--method", method, "--base", "tiny-sd", "--device", "cpu", "--threads", "1"),
            *("--steps", "1", "--warmup", "1", "--batch-size", "2", "--images", "4", "--class-images", "2"),
        ]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == report
    assert set(report) >= FIELDS
    assert report["method"] == method and report["model"] == "tiny-sd" and report["batch"] == 2
    assert report["resolution"] == 32
    assert report["reference_img_s"] > 0 and report["atelier_img_s"] > 0 and report["ratio"] > 0
