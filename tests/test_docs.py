"""/docs and /redoc load nothing from outside the API: on an air-gapped cluster they still render.
In-process checks of the pages and their files, then both pages in headless Chromium with every
request to another host refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service_stack import Stack

CHROMIUM = Path("/usr/bin/chromium")
PAGES = ("/docs", "/redoc")
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def _referenced(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("path", PAGES)
def test_docs_pages_reference_only_the_apis_own_files(api_client: TestClient, path: str) -> None:
    page = api_client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), page.text  # no CDN, no font host, no validator
    urls = _referenced(page.text)
    assert any(url.endswith(".js") for url in urls), urls
    kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in urls:
        asset = api_client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(kinds[Path(url).suffix]), url
        assert len(asset.content) > 1000, url
    # The page's CSP lets its own inline script run (by hash) and nothing from elsewhere.
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    inline = re.findall(r"<script>(.*?)</script>", page.text, flags=re.DOTALL)
    assert csp.count("'sha256-") == len(inline)


def test_docs_assets_are_served_by_exact_name_only(api_client: TestClient) -> None:
    for path in ("/docs-assets/nope.js", "/docs-assets/..%2F__init__.py", "/docs-assets/%2e%2e"):
        assert api_client.get(path).status_code == 404, path


@pytest.mark.services
@pytest.mark.slow
def test_docs_render_in_chromium_without_network(embedded_stack: Stack) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    embedded_stack.start_api()
    errors: list[str] = []
    outside: list[str] = []

    def local_only(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(embedded_stack.base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", local_only)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(embedded_stack.base_url + "/docs")
            # Rendered from the API's own schema: an operation of ours is listed.
            expect(page.locator(".opblock-summary-path", has_text="/v1/jobs").first).to_be_visible()
            page.goto(embedded_stack.base_url + "/redoc")
            expect(page.locator("h1", has_text="Atelier").first).to_be_visible(timeout=20_000)
            expect(page.get_by_text("/v1/jobs").first).to_be_attached()
        finally:
            browser.close()
    assert not outside, outside
    # ReDoc's sidebar credit shows Redocly's logo from their CDN and hides it when it fails to load;
    # the page's CSP blocks it before any request is made. Anything else is a failure.
    assert [e for e in errors if REDOCLY_LOGO not in e] == [], errors
