"""ControlNet datasets: conditioning images pair with their images in zips and multipart uploads,
problems are reported per file, the stored dataset loads back as triples, and a job whose dataset
lacks what its method needs is refused before queueing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.config import Settings
from core.datasets.ingest import load_items
from core.spec.methods import ControlNetParams
from core.storage.local import LocalStorage
from tests.db_fixtures import ApiTenant, SentTasks, make_api_tenant
from tests.test_api_contract import assert_problem, job_body
from tests.test_datasets import (
    PREFIX,
    ingest,
    make_zip,
    noisy,
    png,
    refused,
    rejected_pairs,
    settings,
    storage,
)

__all__ = ["settings", "storage"]  # fixtures, imported so pytest finds them here

RED, GREEN, WHITE = (200, 30, 30), (30, 200, 30), (255, 255, 255)


def accepted(report: Any) -> list[tuple[str, str | None, bool]]:
    return [(a.name, a.caption, a.conditioning is not None) for a in report.accepted]


def test_zip_layout_pairs_images_captions_and_conditioning(storage: LocalStorage, settings: Settings) -> None:
    # Conditioning entries come first in the archive: pairing must not depend on archive order.
    upload = make_zip(
        [
            ("conditioning/0002.png", png((64, 64), WHITE)),
            ("conditioning/0001.png", png((8, 6), GREEN)),
            ("images/0001.png", png((8, 6), RED)),
            ("images/0001.txt", b"a red square"),
            ("images/0002.jpg", noisy("JPEG")),
            ("images/0003.png", png()),
        ]
    )
    report = ingest({"pairs.zip": upload}, storage, settings)

    assert accepted(report) == [
        ("images/0001.png", "a red square", True),
        ("images/0002.jpg", None, True),
        ("images/0003.png", None, False),
    ]
    assert report.rejected == []
    assert storage.list(f"{PREFIX}/conditioning/") == [
        f"{PREFIX}/conditioning/00000.png",
        f"{PREFIX}/conditioning/00001.png",
    ]
    summary = report.to_dict()
    assert summary["counts"] == {"accepted": 3, "rejected": 0, "captioned": 1, "conditioned": 2}
    assert [a["conditioning"] for a in summary["accepted"]] == [True, True, False]
    manifest = json.loads(storage.get_bytes(f"{PREFIX}/dataset.json"))
    assert [i["conditioning"] for i in manifest["items"]] == [
        f"{PREFIX}/conditioning/00000.png",
        f"{PREFIX}/conditioning/00001.png",
        None,
    ]

    items = load_items(storage=storage, dataset_prefix=PREFIX)
    assert [i.name for i in items] == ["images/0001.png", "images/0002.jpg", "images/0003.png"]
    assert items[0].image.getpixel((0, 0)) == RED
    first, second, third = (i.conditioning for i in items)
    assert first is not None and (first.mode, first.size, first.getpixel((3, 3))) == ("RGB", (8, 6), GREEN)
    assert second is not None and second.getpixel((0, 0)) == WHITE
    assert third is None


def test_conditioning_next_to_root_images(storage: LocalStorage, settings: Settings) -> None:
    # <root>/conditioning/x pairs with <root>/x when there is no <root>/images/ folder; the folder
    # name is matched ignoring case, and a same-aspect conditioning image of another size is kept.
    upload = make_zip(
        {
            "set/cat.png": png((8, 6)),
            "set/cat.txt": b"a cat",
            "set/Conditioning/cat.png": png((16, 12), GREEN),
            "other/cat.png": png((8, 6)),
        }
    )
    report = ingest({"set.zip": upload}, storage, settings)

    assert accepted(report) == [("set/cat.png", "a cat", True), ("other/cat.png", None, False)]
    conditioning = load_items(storage=storage, dataset_prefix=PREFIX)[0].conditioning
    assert conditioning is not None and conditioning.size == (16, 12)  # training resizes, not ingestion


def test_multipart_upload_names_conditioning_files_by_folder(
    storage: LocalStorage, settings: Settings
) -> None:
    files = {
        "conditioning/b.png": png((4, 4), WHITE),
        "a.png": png((8, 6)),
        "b.png": png((4, 4)),
        "conditioning/a.webp": png((8, 6), GREEN),  # the extension need not match the image's
        "b.txt": b"bee",
    }
    report = ingest(files, storage, settings)

    assert accepted(report) == [("a.png", None, True), ("b.png", "bee", True)]
    items = load_items(storage=storage, dataset_prefix=PREFIX)
    assert [i.conditioning.getpixel((0, 0)) for i in items if i.conditioning] == [GREEN, WHITE]


def test_conditioning_problems_are_reported_per_file(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip(
        {
            "images/a.png": png((8, 6)),
            "images/b.png": png((8, 6)),
            "images/c.png": png((8, 6)),
            "images/broken.png": b"not an image",
            "conditioning/a.png": png((8, 6), GREEN),
            "conditioning/A.jpg": noisy("JPEG", (8, 6)),  # a second one for the same image
            "conditioning/b.png": png((8, 8)),  # square against 8x6
            "conditioning/c.png": noisy("PNG", (8, 6))[:-40],  # cut short
            "conditioning/ghost.png": png(),
            "conditioning/broken.png": png((8, 6)),  # its image was rejected
        }
    )
    report = ingest({"mixed.zip": upload}, storage, settings)

    assert accepted(report) == [
        ("images/a.png", None, True),
        ("images/b.png", None, False),
        ("images/c.png", None, False),
    ]
    assert rejected_pairs(report) == [
        ("images/broken.png", "unsupported_image_format"),
        ("conditioning/A.jpg", "duplicate_name"),
        ("conditioning/b.png", "conditioning_size_mismatch"),
        ("conditioning/c.png", "image_corrupt"),
        ("conditioning/ghost.png", "conditioning_without_image"),
        ("conditioning/broken.png", "conditioning_without_image"),
    ]
    reasons = {r.name: r.reason for r in report.rejected}
    assert "'conditioning/a.png'" in reasons["conditioning/A.jpg"]
    assert "8x8" in reasons["conditioning/b.png"] and "8x6" in reasons["conditioning/b.png"]
    assert "images/ghost.*" in reasons["conditioning/ghost.png"]
    # Only the accepted pair's conditioning image is stored.
    assert storage.list(f"{PREFIX}/conditioning/") == [f"{PREFIX}/conditioning/00000.png"]


def test_aspect_within_one_percent_is_accepted(storage: LocalStorage, settings: Settings) -> None:
    files = {"a.png": png((200, 100)), "conditioning/a.png": png((201, 100))}
    assert accepted(ingest(files, storage, settings)) == [("a.png", None, True)]


def test_conditioning_only_upload_is_refused_whole(storage: LocalStorage, settings: Settings) -> None:
    error = refused({"conditioning/a.png": png(), "conditioning/b.png": png()}, storage, settings)
    assert error.code == "no_valid_images"
    assert [e["code"] for e in error.errors] == ["conditioning_without_image"] * 2


def test_a_refused_upload_leaves_no_conditioning_image(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip([("a.png", png()), ("conditioning/a.png", png()), ("../evil.png", png())])
    assert refused({"evil.zip": upload}, storage, settings).code == "path_traversal"
    upload = make_zip([("a.png", png()), ("conditioning/a.png", png()), ("z/inner.zip", make_zip({}))])
    assert refused({"nested.zip": upload}, storage, settings).code == "nested_archive"


def test_load_items_refuses_conditioning_keys_outside_the_dataset(
    storage: LocalStorage, settings: Settings
) -> None:
    ingest({"a.png": png(), "conditioning/a.png": png()}, storage, settings)
    manifest_key = f"{PREFIX}/dataset.json"
    manifest = json.loads(storage.get_bytes(manifest_key))
    for key in ("tenants/t2/datasets/ds9/conditioning/00000.png", f"{PREFIX}/images/00000.png"):
        manifest["items"][0]["conditioning"] = key
        storage.put_bytes(manifest_key, json.dumps(manifest).encode())
        with pytest.raises(ValueError, match="outside the dataset"):
            load_items(storage=storage, dataset_prefix=PREFIX)


def test_manifests_without_conditioning_still_load(storage: LocalStorage, settings: Settings) -> None:
    ingest({"a.png": png()}, storage, settings)
    manifest_key = f"{PREFIX}/dataset.json"
    manifest = json.loads(storage.get_bytes(manifest_key))
    del manifest["items"][0]["conditioning"]  # as written before conditioning images existed
    storage.put_bytes(manifest_key, json.dumps(manifest).encode())
    assert load_items(storage=storage, dataset_prefix=PREFIX)[0].conditioning is None


def test_controlnet_params_name_the_images_without_conditioning(
    storage: LocalStorage, settings: Settings
) -> None:
    files = {"a.png": png(), "b.png": png(), "conditioning/a.png": png()}
    report = ingest(files, storage, settings).to_dict()
    problems = ControlNetParams().dataset_problems(report)
    assert len(problems) == 1 and "b.png" in problems[0] and "a.png" not in problems[0]
    assert ControlNetParams(conditioning="canny").dataset_problems(report) == []


# --- through the API: upload, then a job whose dataset must fit its method -------------------------


@pytest.fixture
def tenant(api_client: TestClient, api_settings: Settings) -> ApiTenant:
    return make_api_tenant(api_settings, "acme")


def upload(client: TestClient, tenant: ApiTenant, files: dict[str, bytes]) -> dict[str, Any]:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files.items()]
    response = client.post("/v1/datasets", files=parts, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()


def controlnet_job(dataset_id: str, **params: Any) -> dict[str, Any]:
    return job_body(dataset_id, params={"method": "controlnet", **params})


def test_multipart_conditioning_through_the_api(
    api_client: TestClient, tenant: ApiTenant, sent_tasks: SentTasks
) -> None:
    dataset = upload(api_client, tenant, {"conditioning/a.png": png(), "a.png": png(), "a.txt": b"x"})
    assert dataset["report"]["counts"]["conditioned"] == 1
    assert dataset["report"]["accepted"][0]["conditioning"] is True

    response = api_client.post("/v1/jobs", json=controlnet_job(dataset["id"]), headers=tenant.headers)
    assert response.status_code == 201, response.text
    assert sent_tasks.train == [response.json()["id"]]


def test_controlnet_job_without_conditioning_images_is_422(
    api_client: TestClient, tenant: ApiTenant, sent_tasks: SentTasks
) -> None:
    dataset = upload(api_client, tenant, {"a.png": png(), "b.png": png(), "conditioning/a.png": png()})

    response = api_client.post("/v1/jobs", json=controlnet_job(dataset["id"]), headers=tenant.headers)
    body = assert_problem(response, 422, "dataset_unsuitable")
    assert dataset["id"] in body["detail"] and "controlnet" in body["detail"]
    assert "b.png" in body["detail"] and "canny" in body["detail"]
    assert [e["pointer"] for e in body["errors"]] == ["/dataset_id"]
    assert sent_tasks.train == []

    canny = controlnet_job(dataset["id"], conditioning="canny")
    assert api_client.post("/v1/jobs", json=canny, headers=tenant.headers).status_code == 201


def test_dreambooth_with_two_images_names_method_and_kind(
    api_client: TestClient, api_settings: Settings
) -> None:
    tenant = make_api_tenant(api_settings, image_count=2)
    params = {"method": "dreambooth", "instance_prompt": "a photo of sks dog", "class_prompt": "a dog"}
    response = api_client.post(
        "/v1/jobs", json=job_body(tenant.dataset_id, params=params), headers=tenant.headers
    )
    body = assert_problem(response, 422, "dataset_too_small")
    assert body["detail"] == (
        f"dreambooth needs at least 3 instance images; dataset {tenant.dataset_id} has 2"
    )


def test_datasets_with_conditioning_images_still_train_other_methods(
    api_client: TestClient, tenant: ApiTenant
) -> None:
    dataset = upload(api_client, tenant, {"a.png": png(), "conditioning/a.png": png()})
    response = api_client.post("/v1/jobs", json=job_body(dataset["id"]), headers=tenant.headers)
    assert response.status_code == 201, response.text
