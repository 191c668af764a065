"""The API reference at /docs (Swagger UI) and /redoc (ReDoc), with every file they load served by the
API itself: FastAPI's default pages fetch their scripts, styles and fonts from public CDNs and render
blank on an air-gapped cluster. The scripts come from the `fastapi-offline` package (Swagger UI 5 and
ReDoc 2 bundles), read from its folder by exact name, as the dashboard serves its own files.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from core.errors import not_found

router = APIRouter(include_in_schema=False)

ASSET_PREFIX = "/docs-assets"
FOLDER = Path(fastapi_offline.__file__).resolve().parent / "static"
MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Swagger UI shows a badge loaded from validator.swagger.io for specs not on localhost: turned off.
SWAGGER_PARAMETERS = {"validatorUrl": None}
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _csp(html: str) -> str:
    """Only our files and the page's own inline script (by hash) may run. Both UIs set inline styles
    (ReDoc's styled-components inject <style> elements) and ReDoc searches in a blob: worker."""
    digests = (hashlib.sha256(body.encode()).digest() for body in INLINE_SCRIPT.findall(html))
    hashes = " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


def _page(response: HTMLResponse) -> HTMLResponse:
    html = bytes(response.body).decode()
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": _csp(html),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def _urls(request: Request) -> tuple[str, str]:
    root = request.scope.get("root_path", "")
    return f"{root}{request.app.openapi_url}", f"{root}{ASSET_PREFIX}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return _page(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return _page(
        get_redoc_html(
            openapi_url=openapi_url,
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get(ASSET_PREFIX + "/{name}")
def asset(name: str) -> FileResponse:
    media_type = MEDIA_TYPES.get(name)
    if media_type is None:
        raise not_found("file", name)
    # Versioned by the installed package: a browser revalidates (ETag) instead of re-downloading 2 MB.
    return FileResponse(
        FOLDER / name,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )
