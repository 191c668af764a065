"""The body of `POST /v1/jobs` from `jobs create` flags, YAML files and `--set key=value` overrides.

A `--params` file holds the `params` object, a `--training` file the `training` object; either may
instead be a whole job document (top-level `params:` / `training:` keys, optionally `base_model` and
`dataset_id`). Later sources win: the params file, the training file, the flags, then each `--set`.
The server validates the result; nothing here duplicates its rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cli.output import CliError

JOB_KEYS = frozenset({"params", "training", "base_model", "dataset_id"})


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise CliError(f"{path} must hold a mapping, not {type(document).__name__}")
    return document


def parse_value(text: str) -> Any:
    """`4` → 4, `1e-3` → 0.001, `true` → True, `[a, b]` → a list, anything else → the string.

    JSON first, since YAML 1.1 reads `1e-3` as a string; YAML then for unquoted strings and lists.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_path(body: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` to the job body."""
    key, sep, raw = assignment.partition("=")
    path = [part for part in key.strip().split(".") if part]
    if not sep or not path:
        raise CliError(f"--set {assignment!r}: expected key=value, e.g. training.max_steps=200")
    if path[0] not in JOB_KEYS:
        raise CliError(
            f"--set {assignment!r}: the key starts with params., training., base_model or dataset_id "
            f"(e.g. params.{key} or training.{key})"
        )
    node = body
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CliError(f"--set {assignment!r}: {part} is not an object")
        node = child
    node[path[-1]] = parse_value(raw)


def _merge_file(body: dict[str, Any], path: Path, section: str) -> None:
    document = load_yaml(path)
    if document.keys() & {"params", "training"} and document.keys() <= JOB_KEYS:
        for key, value in document.items():
            if isinstance(value, dict):
                body.setdefault(key, {}).update(value)
            else:
                body[key] = value
    else:
        body.setdefault(section, {}).update(document)


def build_job_body(
    *,
    method: str | None,
    dataset_id: str | None,
    base_model: str | None,
    params_file: Path | None = None,
    training_file: Path | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"params": {}}
    if params_file:
        _merge_file(body, params_file, "params")
    if training_file:
        _merge_file(body, training_file, "training")
    from_file = body["params"].get("method")
    if method and from_file and method != from_file:
        raise CliError(f"--method {method} contradicts method: {from_file} in {params_file}")
    if method:
        body["params"]["method"] = method
    if dataset_id:
        body["dataset_id"] = dataset_id
    if base_model:
        body["base_model"] = base_model
    for assignment in sets or []:
        set_path(body, assignment)
    missing = [flag for key, flag in _REQUIRED if not _get(body, key)]
    if missing:
        raise CliError(f"missing {', '.join(missing)} (a flag, or the field in a YAML file)")
    return body


_REQUIRED = (("params.method", "--method"), ("dataset_id", "--dataset"), ("base_model", "--base-model"))


def _get(body: dict[str, Any], dotted: str) -> Any:
    node: Any = body
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
