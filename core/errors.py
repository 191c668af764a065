"""Domain errors that cross the API boundary as RFC 9457 problem+json with a stable `code`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client can act on. `code` is stable; `detail` is for people."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.errors = errors
        self.headers = headers
        # RFC 9457 extension members: machine-readable facts beside the human `detail`.
        self.extensions = extensions or {}

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://atelier.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return {**self.extensions, **body}


def not_found(kind: str, ident: str) -> ApiError:
    # Another tenant's ids answer exactly like ids that never existed.
    return ApiError(404, f"{kind}_not_found", f"no {kind} with id {ident!r}")


class MethodInputError(ValueError):
    """The job's inputs cannot work (a placeholder token already in the vocabulary, a dataset image
    without its conditioning image): the job fails at once with `code`, no retry."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NonFiniteError(ArithmeticError):
    """Training or a prediction produced NaN or infinite numbers (`training_diverged`,
    `non_finite_artifact`, `non_finite_prediction`): the job fails at once with `code`, no retry. A
    retry would replay the same steps (all randomness is a function of seed and step), so it would
    diverge again; the cure is another learning rate or batch size, which is the user's call."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
