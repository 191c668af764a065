"""The dashboard at `/`: its static files, the dataset image endpoint it shows thumbnails with, and the
pages themselves in headless Chromium against a running service (a LoRA job trained over HTTP)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cli.client import AtelierClient
from cli.demo import PROMPT
from tests.db_fixtures import ApiTenant
from tests.service_stack import Stack

CHROMIUM = Path("/usr/bin/chromium")


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_files() -> list[tuple[str, tuple[str, bytes]]]:
    """Three magenta images of two sizes with captions, and two files the validation rejects."""
    files = {
        "sks_00.png": png((64, 64), (250, 5, 250)),
        "sks_00.txt": PROMPT.encode(),
        "sks_01.png": png((64, 64), (240, 20, 245)),
        "sks_01.txt": PROMPT.encode(),
        "sks_02.png": png((64, 48), (255, 0, 230)),
        "broken.png": b"\x89PNG\r\n\x1a\n not really",
        "orphan.txt": b"a caption with no image",
    }
    return [("files", (name, data)) for name, data in files.items()]


# --- the files and the image endpoint, in-process ----------------------------------------------------


def test_dashboard_files_are_served_without_a_key(api_client: TestClient) -> None:
    page = api_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/dashboard/app.js">' in page.text
    script = api_client.get("/dashboard/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    # Only the folder's own files, by exact name: nothing else on disk is reachable.
    for path in ("/dashboard/nope.js", "/dashboard/..%2Froutes%2Fdashboard.py", "/dashboard/%2e%2e"):
        assert api_client.get(path).status_code == 404, path


def test_dataset_images_and_thumbnails_are_the_tenants_own(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant
) -> None:
    created = api_client.post("/v1/datasets", files=upload_files(), headers=acme.headers)
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["report"]["counts"]["rejected"] == 2
    url = f"/v1/datasets/{dataset['id']}/images"

    full = api_client.get(f"{url}/2", headers=acme.headers)
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(full.content)).size == (64, 48)  # the report's order
    thumb = api_client.get(f"{url}/2", params={"size": 16}, headers=acme.headers)
    assert thumb.status_code == 200 and "private" in thumb.headers["cache-control"]
    assert Image.open(io.BytesIO(thumb.content)).size == (16, 12)

    assert api_client.get(f"{url}/3", headers=acme.headers).status_code == 404
    assert api_client.get(f"{url}/0", params={"conditioning": True}, headers=acme.headers).status_code == 404
    assert api_client.get(f"{url}/0", headers=globex.headers).status_code == 404
    assert api_client.get(f"{url}/0").status_code == 401
    assert api_client.get(f"{url}/0", params={"size": 4096}, headers=acme.headers).status_code == 422


# --- the pages in Chromium ----------------------------------------------------------------------------


def _train(client: AtelierClient) -> tuple[dict, dict]:
    response = client.http.post("/v1/datasets", files=upload_files(), data={"name": "magenta"})
    assert response.status_code == 201, response.text
    dataset = response.json()
    job = client.create_job(
        {
            "base_model": "tiny-sd",
            "dataset_id": dataset["id"],
            "params": {"method": "lora", "rank": 4, "alpha": 2},
            "training": {
                "max_steps": 6,
                "learning_rate": 1e-3,
                "batch_size": 2,
                "seed": 1,
                "checkpoint_every": 3,
                "sample_every": 3,
                "sample_prompts": [PROMPT, "a red circle"],
            },
        }
    )
    return dataset, job


def _shot(page, tmp_path: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.services
@pytest.mark.slow
def test_dashboard_in_chromium(embedded_stack: Stack, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    embedded_stack.start_api(with_worker=True)
    client = embedded_stack.client()
    dataset, job = _train(client)
    key = client.http.headers["Authorization"].removeprefix("Bearer ")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            # The wrong key's 401 is logged as a failed resource load: expected, not a page error.
            page.on(
                "console",
                lambda m: (
                    errors.append(m.text) if m.type == "error" and "status of 401" not in m.text else None
                ),
            )
            _key_and_jobs_table(page, embedded_stack.base_url, key, job["id"], tmp_path)
            final = _job_page(page, client, job["id"], tmp_path, embedded_stack)
            _dataset_page(page, dataset, tmp_path)
        finally:
            browser.close()
    assert final["status"] == "succeeded"
    assert not errors, errors


def _key_and_jobs_table(page, base_url: str, key: str, job_id: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    page.fill("#api-key", "not-a-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form .error")).to_contain_text("not accepted")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    row = page.locator(f"tr.job-row[data-job-id='{job_id}']")
    expect(row).to_be_visible()
    expect(row).to_contain_text("lora")
    expect(row).to_contain_text("tiny-sd")
    expect(row.locator(".progress-label")).to_contain_text("/6")
    # The key is asked for once: a reload goes straight to the table.
    page.reload()
    expect(row).to_be_visible()
    _shot(page, tmp_path, "jobs")
    row.locator("a").click()


def _job_page(page, client: AtelierClient, job_id: str, tmp_path: Path, stack: Stack) -> dict:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    opened_as = page.locator("#job-status").inner_text(timeout=10_000)
    # No reload from here on: the status, curve, samples and artifact arrive over the event stream.
    try:
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=240_000)
    except AssertionError:
        raise AssertionError(f"job did not succeed: {client.job(job_id)}\n{stack.log('worker')}") from None
    print(f"job page opened while the job was {opened_as}")
    final = client.job(job_id)
    manifest = client.artifact(final["artifact_id"])["manifest"]
    steps = [step for step, _ in manifest["metrics"]["loss_history"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    chart = page.locator("#loss-chart svg.loss-chart")
    expect(chart).to_have_attribute("data-steps", ",".join(map(str, steps)))
    assert len(chart.locator("polyline.loss-raw").get_attribute("points").split()) == len(steps)
    expect(chart.locator("circle.loss-point")).to_have_count(len(steps))

    samples = page.locator("#samples img.sample")
    expect(samples).to_have_count(4)  # two prompts at steps 3 and 6
    expect(page.locator("#samples .sample-group")).to_have_count(2)
    page.wait_for_function(
        "[...document.querySelectorAll('#samples img.sample')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert all(src.startswith("blob:") for src in samples.evaluate_all("els => els.map(e => e.src)"))

    formats = page.locator("#artifact-formats tr")
    expect(formats.locator("th")).to_have_text(["diffusers", *manifest["exports"]])
    expect(
        page.locator("#artifact button.download[data-file='pytorch_lora_weights.safetensors']")
    ).to_be_visible()
    events = page.locator("#events tbody tr")
    expect(events.last).to_have_attribute("data-type", "succeeded")
    types = events.evaluate_all("rows => rows.map(r => r.dataset.type)")
    assert types[0] == "created" and {"started", "checkpoint", "sample"} <= set(types)
    _download_from_the_page(page, manifest)
    _shot(page, tmp_path, "job")
    return final


def _download_from_the_page(page, manifest: dict) -> None:  # type: ignore[no-untyped-def]
    """The file the browser saves is the manifest's file, byte for byte (checked by its size)."""
    name = "pytorch_lora_weights.safetensors"
    with page.expect_download() as info:
        page.click(f"#artifact button.download[data-format='diffusers'][data-file='{name}']")
    saved = Path(info.value.path())
    assert info.value.suggested_filename == name
    assert saved.stat().st_size == next(f["bytes"] for f in manifest["files"] if f["name"] == name)


def _dataset_page(page, dataset: dict, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page.click(f"a[href='#/datasets/{dataset['id']}']")
    expect(page.locator("#dataset-counts .count-accepted strong")).to_have_text("3")
    expect(page.locator("#dataset-counts .count-rejected strong")).to_have_text("2")
    rejected = page.locator("#rejected tbody tr")
    expect(rejected).to_have_count(2)
    expect(rejected.filter(has_text="broken.png")).to_be_visible()
    expect(rejected.filter(has_text="caption_without_image")).to_contain_text("orphan.txt")
    expect(page.locator("#resolutions tbody tr")).to_have_count(2)
    thumbs = page.locator("#thumbnails img.thumb")
    expect(thumbs).to_have_count(3)
    thumbs.last.scroll_into_view_if_needed()  # they load as they scroll into view
    page.wait_for_function(
        "[...document.querySelectorAll('#thumbnails img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    )
    expect(page.locator("#thumbnails figcaption").first).to_contain_text(PROMPT)
    _shot(page, tmp_path, "dataset")
