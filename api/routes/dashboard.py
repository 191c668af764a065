"""The dashboard at `/`: static HTML, CSS and JS modules from api/dashboard/, served by the API itself.

There is no build step and nothing is fetched from elsewhere: the pages are plain ES modules that call
the same /v1 API as every other client, with the key the user types (kept in localStorage). Views are
chosen by the URL fragment (`#/jobs/job_...`), so `/` is the only page URL.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from core.errors import not_found

router = APIRouter(include_in_schema=False)

FOLDER = Path(__file__).resolve().parent.parent / "dashboard"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The pages render user-supplied names, captions and prompts; should one ever reach the DOM as markup,
# no script but ours may run. Images and downloads come from the API or presigned storage URLs.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: http: https:; "
    "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with each deploy: revalidate rather than serve a stale mix of modules.
    "Cache-Control": "no-cache",
}
# Only the files present when the API starts are served, by exact name: no path from a request ever
# reaches the filesystem.
ASSETS = {p.name: p for p in FOLDER.iterdir() if p.suffix in MEDIA_TYPES} if FOLDER.is_dir() else {}


def _file(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise not_found("file", name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def dashboard() -> FileResponse:
    return _file("index.html")


@router.get("/dashboard/{name}")
def dashboard_asset(name: str) -> FileResponse:
    return _file(name)
