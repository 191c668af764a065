"""What the HTTP commands print: results on stdout (ids, paths, tables, JSON) so scripts can capture
them, and everything for people (summaries, progress, errors) on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from cli.client import ApiProblem

MAX_ERRORS_SHOWN = 20


class CliError(Exception):
    """A mistake on the command line or a local file problem (exit code 2, like argparse's own)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def say(text: str = "") -> None:
    """A line for people, on stderr."""
    print(text, file=sys.stderr)


def emit(text: str) -> None:
    """A result, on stdout."""
    print(text, flush=True)


def emit_json(value: Any) -> None:
    emit(json.dumps(value, indent=2, sort_keys=False))


def problem_lines(problem: ApiProblem) -> list[str]:
    """The problem's detail, then each listed error the detail does not already say."""
    lines = [f"error: {problem.detail} ({problem.code}, HTTP {problem.status})"]
    errors = problem.body.get("errors") or []
    for error in errors[:MAX_ERRORS_SHOWN]:
        if not isinstance(error, dict):
            continue
        where = error.get("pointer") or error.get("file") or error.get("name") or ""
        what = error.get("message") or error.get("reason") or error.get("code") or ""
        line = f"{where}: {what}".strip(": ")
        if line and line not in problem.detail:
            lines.append(f"  {line}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def dataset_summary(dataset: dict[str, Any]) -> list[str]:
    """The validation report in a few lines: counts, rejected files with reasons, resolutions."""
    report = dataset.get("report") or {}
    counts = report.get("counts") or {}
    name = f" ({dataset['name']})" if dataset.get("name") else ""
    count = dataset["image_count"]
    images = f"{count} image{'' if count == 1 else 's'}"
    lines = [
        f"dataset {dataset['id']}{name}: {dataset['status']}, {images} accepted "
        f"({counts.get('captioned', 0)} captioned, {counts.get('conditioned', 0)} with conditioning), "
        f"{counts.get('rejected', 0)} rejected"
    ]
    for rejected in report.get("rejected", [])[:MAX_ERRORS_SHOWN]:
        lines.append(f"  rejected {rejected['name']}: {rejected['code']}: {rejected['reason']}")
    common = (report.get("resolutions") or {}).get("most_common") or []
    if common:
        sizes = ", ".join(f"{r['width']}x{r['height']} ({r['count']})" for r in common[:5])
        lines.append(f"  resolutions: {sizes}")
    return lines
