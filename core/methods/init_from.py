"""Whether a lora job can start from a hyper_lora artifact (`init_from`); torch-free, so the API
answers before any GPU time and the worker asks the same question again."""

from __future__ import annotations

from typing import Any

from core.spec.methods import LoraParams


def check_compatible(hyper_manifest: dict[str, Any], *, base_model: str, lora: LoraParams) -> list[str]:
    """Why a lora job with these params cannot start from this hyper_lora artifact (empty: it can)."""
    problems = []
    if hyper_manifest.get("method") != "hyper_lora":
        problems.append(f"the artifact is a {hyper_manifest.get('method')} artifact, not a hyper_lora")
        return problems
    trained_on = hyper_manifest.get("base_model")
    if isinstance(trained_on, dict):  # manifest.json's {"id": ..., "family": ...}
        trained_on = trained_on.get("id")
    if trained_on != base_model:
        problems.append(f"the hyper_lora predicts for base {trained_on!r}, not {base_model!r}")
    params = hyper_manifest.get("params", {})
    rank = params.get("rank")
    alpha = float(params.get("alpha") or rank or 0)
    if lora.rank != rank:
        problems.append(f"params.rank must be {rank}, the rank the hyper_lora predicts")
    if lora.effective_alpha != alpha:
        problems.append(f"params.alpha must be {alpha:g}, the alpha the hyper_lora predicts for")
    targets = params.get("targets", "attention")
    if lora.targets != targets:
        problems.append(f"params.targets must be {targets!r}, the layers the hyper_lora predicts for")
    return problems
