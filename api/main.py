"""create_app(): routers, problem+json error handlers, and migrations at start."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.routes import artifacts, catalog, datasets, files, generations, health, jobs
from core.config import get_settings
from core.db import upgrade
from core.errors import ApiError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def _problem(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(instance=request.url.path),
        status_code=error.status,
        media_type=PROBLEM,
        headers=error.headers,
    )


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        out.append(
            {
                "pointer": "/" + "/".join(loc[1:] if loc and loc[0] == "body" else loc),
                "location": loc[0] if loc else None,
                "message": err.get("msg"),
                "type": err.get("type"),
            }
        )
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _problem(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        named = "; ".join(f"{e['pointer']}: {e['message']}" for e in errors[:5])
        return _problem(
            request, ApiError(422, "invalid_request", f"the request is invalid: {named}", errors=errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _problem(request, ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _problem(request, ApiError(500, "internal_error", "an unexpected error occurred"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A bad DSN or bucket stops the process here, before it accepts a request.
    settings = get_settings()
    upgrade(settings.database_url)
    yield


def create_app(*, migrate: bool = True) -> FastAPI:
    app = FastAPI(title="Atelier", version="1.0", lifespan=lifespan if migrate else None)
    install_error_handlers(app)
    for module in (health, catalog, datasets, jobs, artifacts, generations, files):
        app.include_router(module.router)
    return app
