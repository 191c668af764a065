"""The method catalogue (core/spec/catalogue.py) is the one list of methods: every consumer knows
every method in it, and nothing else names a method it lacks. Adding a method to one place only
(a params model, a method file, an exporter, a generation field, an entry) fails here."""

from __future__ import annotations

import ast
import pkgutil
import typing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

import core.exports
import core.methods
import core.spec.methods
from api.openapi_examples import JOB_EXAMPLES
from core.bases.architectures import KNOWN
from core.db import new_session, upgrade
from core.exports import exporter
from core.exports.formats import ALIASES, FORMATS, PRIMARY, resolve_format
from core.generation.params import GenerationSpec
from core.methods import UnknownMethod, get_method
from core.methods.context import APPLY_ORDER as CONTEXT_APPLY_ORDER
from core.metrics import database_metrics
from core.spec.base import MethodParamsBase
from core.spec.catalogue import (
    APPLY_ORDER,
    CATALOGUE,
    GENERATION_USES,
    MethodName,
    MethodParams,
)
from core.spec.job import JobSpec
from core.training import memory
from core.training.param_counts import TRAINED_COUNTS

NAMES = list(CATALOGUE)
# Modules of core/exports that write no method's format of their own: the shared parts.
EXPORT_HELPERS = {"formats", "ldm_layout"}


def _method_classes_in_source() -> dict[str, str]:
    """name -> "module:Class" of every class in core/methods that declares `name: ClassVar[str] = ...`,
    read from the source (no imports), so a method file without an entry is found too."""
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(core.methods.__path__):
        path = Path(core.methods.__path__[0]) / f"{info.name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if (
                    isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and item.target.id == "name"
                    and isinstance(item.value, ast.Constant)
                ):
                    found[item.value.value] = f"core.methods.{info.name}:{node.name}"
    return found


def test_names_and_the_params_union_come_from_the_catalogue() -> None:
    assert list(typing.get_args(MethodName)) == NAMES
    union, _discriminator = typing.get_args(MethodParams)
    assert list(typing.get_args(union)) == [entry.params for entry in CATALOGUE.values()]
    for name, entry in CATALOGUE.items():
        # The discriminator tag of each params model is its entry's name.
        assert entry.params.model_fields["method"].default == name
        assert JobSpec.model_validate(JOB_EXAMPLES[name]["value"]).params.method == name


def test_every_params_model_has_an_entry() -> None:
    defined = {
        value
        for value in vars(core.spec.methods).values()
        if isinstance(value, type) and issubclass(value, MethodParamsBase) and value is not MethodParamsBase
    }
    assert defined == {entry.params for entry in CATALOGUE.values()}


def test_every_method_class_has_an_entry_and_get_method_finds_it() -> None:
    assert _method_classes_in_source() == {name: entry.implementation for name, entry in CATALOGUE.items()}
    for name, entry in CATALOGUE.items():
        method = get_method(name)
        assert (method.name, method.Params, method.dataset_kind) == (name, entry.params, entry.dataset_kind)
    with pytest.raises(UnknownMethod):
        get_method("core.methods.lora:LoraMethod")  # only names, never paths


def test_every_export_format_has_its_exporter_and_every_exporter_an_entry() -> None:
    assert set(FORMATS) == set(ALIASES) == set(CATALOGUE)
    named_modules = set()
    for name, entry in CATALOGUE.items():
        assert set(FORMATS[name]) == {offered.name for offered in entry.exports}
        for offered in entry.exports:
            assert callable(exporter(name, offered.name))
            named_modules.add(offered.exporter.split(":")[0])
            for alias in (offered.name, *offered.aliases):
                assert resolve_format(name, alias) == offered.name
        for alias in entry.primary_aliases:
            assert resolve_format(name, alias) == PRIMARY
    modules = {f"core.exports.{m.name}" for m in pkgutil.iter_modules(core.exports.__path__)}
    assert modules - {f"core.exports.{helper}" for helper in EXPORT_HELPERS} == named_modules


def _artifact_fields() -> set[str]:
    """GenerationSpec fields that name artifacts: their models (alone or in a list) have an artifact_id."""

    def models(annotation: object) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    return {
        name
        for name, info in GenerationSpec.model_fields.items()
        if any("artifact_id" in m.model_fields for m in models(info.annotation))
    }


def test_every_generation_field_is_a_catalogue_use_applied_in_order() -> None:
    assert _artifact_fields() == {use.field for use in GENERATION_USES.values()}
    assert CONTEXT_APPLY_ORDER == APPLY_ORDER == tuple(GENERATION_USES)
    orders = [use.order for use in GENERATION_USES.values()]
    assert orders == sorted(set(orders))  # distinct: no two methods tie in the order
    # A request using every field once: uses() walks every method, in the apply order.
    image = "img_" + "0" * 24
    request: dict[str, object] = {"base_model": "tiny-sd", "prompt": "a cat"}
    for use in GENERATION_USES.values():
        ref = {"artifact_id": f"art_{use.field}", **({"image": image} if use.image else {})}
        many = typing.get_origin(GenerationSpec.model_fields[use.field].annotation) is list
        request[use.field] = [ref] if many else ref
    uses = GenerationSpec.model_validate(request).uses()
    assert [u.method for u in uses] == list(APPLY_ORDER)
    for u in uses:
        assert (u.image is not None) == GENERATION_USES[u.method].image
        assert callable(get_method(u.method).apply)


def test_the_memory_planner_counts_every_method() -> None:
    assert set(TRAINED_COUNTS) == {entry.memory.trained for entry in CATALOGUE.values()}
    assert set(memory.ACTIVATION_COEFFICIENTS) == {(n, c) for n in NAMES for c in (False, True)}
    for name in NAMES:
        spec = JobSpec.model_validate(JOB_EXAMPLES[name]["value"])
        for arch in (KNOWN["tiny-sd"], KNOWN["sdxl"]):
            estimate = memory.estimate(spec, arch)
            assert estimate.parts["trained_weights"] > 0 and estimate.parts["activations"] > 0, name


def test_get_methods_lists_every_method(api_client: TestClient) -> None:
    data = api_client.get("/v1/methods").json()["data"]
    assert [m["name"] for m in data] == NAMES
    for served in data:
        entry = CATALOGUE[served["name"]]
        assert (served["dataset_kind"], served["min_images"]) == (entry.dataset_kind, entry.min_images)
        assert served["params"]["properties"]["method"]["default"] == entry.name


def test_metrics_have_a_series_for_every_method(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(url)
    session = new_session(url)
    try:
        families = {family.name: family for family in database_metrics(session)}
    finally:
        session.close()
    for name in ("atelier_jobs", "atelier_artifacts"):
        assert {s.labels["method"] for s in families[name].samples} == set(NAMES), name
