"""Composition on the API's side: POST /v1/generations refuses an artifact whose base family or
architecture does not fit the request's base, and allows one from another base of the same family
and architecture.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from core.bases.allow_list import BUILTIN_ARCHITECTURES
from core.config import Settings
from tests import composition_fixtures as fixtures
from tests import test_training_loop as shared
from tests.db_fixtures import ApiTenant
from tests.test_api_contract import assert_problem
from tests.test_generation_api import make_artifact, post, request

one_thread, tiny_cache, solid = shared.one_thread, shared.tiny_cache, shared.solid
fresh_worker_caches, bases = fixtures.fresh_worker_caches, fixtures.bases


def manifest_on(base_model: str, family: str | None, architecture: dict[str, Any] | None) -> dict[str, Any]:
    manifest: dict[str, Any] = {"files": [], "base_model": {"id": base_model}}
    if family is not None:
        manifest["base_model"]["family"] = family
    if architecture is not None:
        manifest["base_architecture"] = architecture
    return manifest


SD_ARCH, SDXL_ARCH = BUILTIN_ARCHITECTURES["tiny-sd"], BUILTIN_ARCHITECTURES["tiny-sdxl"]


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
