"""create_app(): routers, problem+json error handlers, and migrations at start."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import openapi_examples
from api.routes import (
    artifacts,
    catalog,
    dashboard,
    datasets,
    docs,
    files,
    generations,
    health,
    images,
    jobs,
    metrics,
    usage,
    webhooks,
)
from core.config import get_settings
from core.db import upgrade
from core.errors import ApiError
from core.logs import adopt_loggers

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def _problem(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(instance=request.url.path),
        status_code=error.status,
        media_type=PROBLEM,
        headers=error.headers,
    )


def _json_pointer(loc: list[Any], body: Any) -> str:
    """RFC 6901 pointer into the request body for a pydantic error location.

    pydantic puts a discriminated union's tag ("lora") into the location, but the client's document
    has no such key: walking the body drops it, so `/params/lora/rank` becomes `/params/rank`.
    """
    parts: list[str] = []
    node = body
    for segment in loc:
        if isinstance(node, dict) and segment not in node and segment in node.values():
            continue
        parts.append(str(segment))
        if isinstance(node, dict):
            node = node.get(segment)
        elif isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node):
            node = node[segment]
        else:
            node = None
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        where = str(loc[0]) if loc else None
        ctx = err.get("ctx") or {}
        if err.get("type") == "json_invalid":
            # loc carries a character offset, not a field: the whole document is at fault.
            pointer, message = "", f"{err.get('msg')}: {ctx.get('error', '')}".rstrip(": ")
        else:
            path = loc[1:] if where == "body" else loc
            if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                path.append(str(ctx.get("discriminator", "")).strip("'"))  # the field to fix
            pointer = _json_pointer(path, exc.body if where == "body" else None)
            # A check across fields (core.spec.base.field_error) names the field it is about.
            pointer += ctx.get("field_pointer", "")
            message = err.get("msg")
        out.append({"pointer": pointer, "location": where, "message": message, "type": err.get("type")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _problem(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        named = "; ".join(f"{e['pointer']}: {e['message']}".lstrip(": ") for e in errors[:5])
        return _problem(
            request, ApiError(422, "invalid_request", f"the request is invalid: {named}", errors=errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _problem(request, ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        # The database is unreachable (restarting, failing over, the network cut): the request is
        # fine and a retry will do, so 503 with Retry-After rather than a 500. Registered for this
        # class, not caught by `unexpected` below: Starlette re-raises what its catch-all handles,
        # and uvicorn then drops the connection (a session closing on a dead connection raises it).
        log.warning("database unavailable on %s: %s", request.url.path, exc.orig)
        detail = "the database is unreachable; try again shortly"
        return _problem(request, ApiError(503, "database_unavailable", detail, headers={"Retry-After": "5"}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _problem(request, ApiError(500, "internal_error", "an unexpected error occurred"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A bad DSN or bucket stops the process here, before it accepts a request.
    settings = get_settings()
    # uvicorn installed its own text handlers after the CLI configured logging: route them to ours.
    adopt_loggers()
    upgrade(settings.database_url)
    yield


def create_app(*, migrate: bool = True) -> FastAPI:
    # The default /docs and /redoc load their scripts from CDNs; api/routes/docs.py serves its own.
    app = FastAPI(
        title="Atelier",
        version="1.0",
        lifespan=lifespan if migrate else None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    for module in (
        health,
        catalog,
        datasets,
        jobs,
        webhooks,
        artifacts,
        generations,
        images,
        files,
        dashboard,
        docs,
        metrics,
        usage,
    ):
        app.include_router(module.router)
    openapi_examples.install(app)
    return app
