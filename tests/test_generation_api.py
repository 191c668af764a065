"""POST /v1/generations with every artifact kind, and POST /v1/images, checked before queueing.

In-process on SQLite with the broker recorded (no torch): each field's artifact must exist, be the
tenant's, be of that field's method and of the request's base model; images are image ids or data
URIs that decode to a valid image, and a stored request holds only image ids.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.config import Settings
from core.generation.images import ImageNotFound, image_key, load_image
from core.generation.params import IMAGE_ID, GenerationSpec
from core.methods.context import APPLY_ORDER
from core.storage.artifacts import read_manifest
from core.storage.base import Storage, upload_dir
from core.storage.factory import make_storage
from tests.db_fixtures import ApiTenant, SentTasks, succeed_with_artifact
from tests.test_api_contract import assert_problem, job_body

RED, BLUE = (220, 20, 20), (20, 20, 220)
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "dreambooth": {"method": "dreambooth", "instance_prompt": "a sks dog", "class_prompt": "a dog"},
    "textual_inversion": {
        "method": "textual_inversion",
        "placeholder_token": "<x>",
        "initializer_token": "a",
    },
    "hypernetwork": {"method": "hypernetwork"},
    "controlnet": {"method": "controlnet", "conditioning": "canny"},
    "ip_adapter": {"method": "ip_adapter"},
}


def png(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = RED) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def truncated_png() -> bytes:
    """Random pixels cut in half: the header reads, the pixel data does not."""
    out = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3)).save(out, format="PNG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def storage(api_settings: Settings) -> Storage:
    return make_storage(api_settings)


def make_artifact(
    client: TestClient,
    settings: Settings,
    tenant: ApiTenant,
    method: str,
    base_model: str = "tiny-sd",
    *,
    manifest: dict[str, Any] | None = None,
    files: Path | None = None,
) -> str:
    """A succeeded job of `method` and its artifact, run straight through core.jobs.states as a worker would.

    The manifest is `manifest`, or that of the trained artifact folder `files` (then uploaded where
    the worker looks), or a bare one with no file list, as written before manifests grew fields."""
    body = job_body(tenant.dataset_id, params=METHOD_PARAMS[method], base_model=base_model)
    response = client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    prefix = f"jobs/{job_id}/attempt-1"
    if files is not None:
        upload_dir(make_storage(settings), files, prefix)
        manifest = read_manifest(files)
    return succeed_with_artifact(
        settings.database_url, job_id, prefix=prefix, manifest=manifest or {"files": []}
    )


@pytest.fixture
def artifacts(api_client: TestClient, api_settings: Settings, acme: ApiTenant) -> dict[str, str]:
    """One artifact of each method, acme's, on tiny-sd."""
    return {m: make_artifact(api_client, api_settings, acme, m) for m in METHOD_PARAMS}


def upload_image(client: TestClient, tenant: ApiTenant, data: bytes, name: str = "ref.png") -> Any:
    return client.post("/v1/images", files={"file": (name, data, "image/png")}, headers=tenant.headers)


def request(**fields: Any) -> dict[str, Any]:
    return {"base_model": "tiny-sd", "prompt": "a red square", "steps": 2, "seed": 1, **fields}


def post(client: TestClient, tenant: ApiTenant, body: dict[str, Any]) -> Any:
    return client.post("/v1/generations", json=body, headers=tenant.headers)


def stored_images(storage: Storage, tenant: ApiTenant) -> list[str]:
    return storage.list(f"tenants/{tenant.tenant_id}/images/")


# --- a request using everything ------------------------------------------------------------------


def test_every_artifact_kind_in_one_request(
    api_client: TestClient,
    acme: ApiTenant,
    artifacts: dict[str, str],
    storage: Storage,
    sent_tasks: SentTasks,
) -> None:
    uploaded = upload_image(api_client, acme, png(color=BLUE)).json()["id"]
    body = request(
        dreambooth={"artifact_id": artifacts["dreambooth"]},
        textual_inversions=[{"artifact_id": artifacts["textual_inversion"]}],
        loras=[{"artifact_id": artifacts["lora"], "scale": 0.5}],
        hypernetwork={"artifact_id": artifacts["hypernetwork"], "strength": 0.7},
        controlnet={"artifact_id": artifacts["controlnet"], "image": uploaded, "scale": 0.8},
        ip_adapter={"artifact_id": artifacts["ip_adapter"], "image": data_uri(png(color=RED)), "scale": 0.6},
    )
    response = post(api_client, acme, body)
    assert response.status_code == 201, response.text
    generation = response.json()
    assert sent_tasks.generate == [generation["id"]]

    # What was stored is what the worker reads: ids only, the single ControlNet as a list.
    stored = api_client.get(f"/v1/generations/{generation['id']}", headers=acme.headers).json()["request"]
    assert stored["controlnet"] == [{"artifact_id": artifacts["controlnet"], "image": uploaded, "scale": 0.8}]
    reference = stored["ip_adapter"]["image"]
    assert IMAGE_ID.match(reference) and "base64" not in str(stored)
    assert sorted(stored_images(storage, acme)) == sorted(
        image_key(acme.tenant_id, i) for i in (uploaded, reference)
    )
    assert load_image(reference, acme.tenant_id, storage).getpixel((0, 0)) == RED
    assert load_image(uploaded, acme.tenant_id, storage).getpixel((0, 0)) == BLUE

    uses = GenerationSpec.model_validate(stored).uses()
    assert [(u.method, u.artifact_id, u.scale, u.image, u.pointer) for u in uses] == [
        ("dreambooth", artifacts["dreambooth"], 1.0, None, "/dreambooth"),
        ("textual_inversion", artifacts["textual_inversion"], 1.0, None, "/textual_inversions/0"),
        ("lora", artifacts["lora"], 0.5, None, "/loras/0"),
        ("ip_adapter", artifacts["ip_adapter"], 0.6, reference, "/ip_adapter"),
        ("hypernetwork", artifacts["hypernetwork"], 0.7, None, "/hypernetwork"),
        ("controlnet", artifacts["controlnet"], 0.8, uploaded, "/controlnet/0"),
    ]
    # The worker applies in the context's fixed order; uses() lists them in that order already.
    assert [u.method for u in uses] == sorted((u.method for u in uses), key=APPLY_ORDER.index)


def test_several_controlnets_keep_their_order(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, artifacts: dict[str, str]
) -> None:
    other = make_artifact(api_client, api_settings, acme, "controlnet")
    image = upload_image(api_client, acme, png()).json()["id"]
    nets = [
        {"artifact_id": artifacts["controlnet"], "image": image, "scale": 1.0},
        {"artifact_id": other, "image": data_uri(png()), "scale": 0.5},
    ]
    response = post(api_client, acme, request(controlnet=nets))
    assert response.status_code == 201, response.text
    stored = response.json()["request"]["controlnet"]
    assert [(c["artifact_id"], c["scale"]) for c in stored] == [(artifacts["controlnet"], 1.0), (other, 0.5)]
    assert stored[0]["image"] == image and IMAGE_ID.match(stored[1]["image"])


# --- artifacts: existence, tenancy, method, base model ---------------------------------------------


def use_of(method: str, artifact_id: str, image: str) -> dict[str, Any]:
    """The request fields that use `artifact_id` in the field of `method`."""
    ref: dict[str, Any] = {"artifact_id": artifact_id}
    return {
        "lora": {"loras": [ref]},
        "dreambooth": {"dreambooth": ref},
        "textual_inversion": {"textual_inversions": [ref]},
        "hypernetwork": {"hypernetwork": ref},
        "controlnet": {"controlnet": {**ref, "image": image}},
        "ip_adapter": {"ip_adapter": {**ref, "image": image}},
    }[method]


POINTERS = {
    "lora": "/loras/0",
    "dreambooth": "/dreambooth",
    "textual_inversion": "/textual_inversions/0",
    "hypernetwork": "/hypernetwork",
    "controlnet": "/controlnet/0",
    "ip_adapter": "/ip_adapter",
}


@pytest.mark.parametrize("field", list(METHOD_PARAMS))
def test_an_artifact_of_another_method_is_422(
    api_client: TestClient,
    acme: ApiTenant,
    artifacts: dict[str, str],
    storage: Storage,
    sent_tasks: SentTasks,
    field: str,
) -> None:
    wrong = "controlnet" if field == "lora" else "lora"
    body = request(**use_of(field, artifacts[wrong], data_uri(png())))
    problem = assert_problem(post(api_client, acme, body), 422, "artifact_incompatible")
    assert problem["detail"] == (
        f"{POINTERS[field]}/artifact_id: artifact {artifacts[wrong]} is a {wrong}, not a {field}"
    )
    assert [e["pointer"] for e in problem["errors"]] == [f"{POINTERS[field]}/artifact_id"]
    assert sent_tasks.generate == []
    assert stored_images(storage, acme) == []  # the data URI was never stored


@pytest.mark.parametrize("field", list(METHOD_PARAMS))
def test_an_artifact_of_another_base_model_is_422(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, sent_tasks: SentTasks, field: str
) -> None:
    sdxl = make_artifact(api_client, api_settings, acme, field, base_model="tiny-sdxl")
    image = upload_image(api_client, acme, png()).json()["id"]
    problem = assert_problem(
        post(api_client, acme, request(**use_of(field, sdxl, image))), 422, "artifact_incompatible"
    )
    assert sdxl in problem["detail"]
    assert "'tiny-sdxl'" in problem["detail"] and "'tiny-sd'" in problem["detail"]
    assert sent_tasks.generate == []


@pytest.mark.parametrize("field", list(METHOD_PARAMS))
def test_missing_and_foreign_artifacts_are_404_alike(
    api_client: TestClient,
    api_settings: Settings,
    acme: ApiTenant,
    globex: ApiTenant,
    artifacts: dict[str, str],
    field: str,
) -> None:
    image = upload_image(api_client, globex, png()).json()["id"]
    owned = artifacts[field]
    missing = owned[:-1] + ("1" if owned.endswith("0") else "0")
    foreign = post(api_client, globex, request(**use_of(field, owned, image)))
    absent = post(api_client, globex, request(**use_of(field, missing, image)))
    assert_problem(foreign, 404, "artifact_not_found")
    assert foreign.text.replace(owned, "<id>") == absent.text.replace(missing, "<id>")


def test_the_same_textual_inversion_twice_is_422(
    api_client: TestClient, acme: ApiTenant, artifacts: dict[str, str]
) -> None:
    ref = {"artifact_id": artifacts["textual_inversion"]}
    problem = assert_problem(
        post(api_client, acme, request(textual_inversions=[ref, ref])), 422, "invalid_request"
    )
    assert [e["pointer"] for e in problem["errors"]] == ["/textual_inversions"]


# --- images in requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["controlnet", "ip_adapter"])
@pytest.mark.parametrize(
    ("image", "status", "code", "where"),
    [
        (data_uri(b"GIF89a not really"), 422, "unsupported_image_format", "/image"),
        (data_uri(truncated_png()), 422, "image_corrupt", "/image"),
        ("data:image/png;base64,%%%not-base64", 422, "invalid_data_uri", "/image"),
        (data_uri(png(), "image/gif"), 422, "invalid_request", "/image"),
        ("../../datasets/ds_x/images/00000", 422, "invalid_request", "/image"),
        ("img_0123456789abcdef01234567", 404, "image_not_found", None),
    ],
    ids=["not an image", "truncated", "bad base64", "gif media type", "a path", "unknown id"],
)
def test_bad_images_are_refused_naming_the_field(
    api_client: TestClient,
    acme: ApiTenant,
    artifacts: dict[str, str],
    storage: Storage,
    sent_tasks: SentTasks,
    field: str,
    image: str,
    status: int,
    code: str,
    where: str | None,
) -> None:
    problem = assert_problem(
        post(api_client, acme, request(**use_of(field, artifacts[field], image))), status, code
    )
    if where is not None:
        pointer = POINTERS[field] + where
        assert [e["pointer"] for e in problem["errors"]] == [pointer]
        assert pointer in problem["detail"]
    assert sent_tasks.generate == []
    assert stored_images(storage, acme) == []


@pytest.mark.parametrize("field", ["controlnet", "ip_adapter"])
def test_controlnet_and_ip_adapter_need_an_image(
    api_client: TestClient, acme: ApiTenant, artifacts: dict[str, str], field: str
) -> None:
    body = request(**{field: {"artifact_id": artifacts[field]}})
    problem = assert_problem(post(api_client, acme, body), 422, "invalid_request")
    assert [e["pointer"] for e in problem["errors"]] == [POINTERS[field] + "/image"]


def test_another_tenants_image_is_404_like_a_missing_one(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant, artifacts: dict[str, str]
) -> None:
    theirs = upload_image(api_client, globex, png()).json()["id"]
    missing = theirs[:-1] + ("1" if theirs.endswith("0") else "0")
    foreign = post(api_client, acme, request(**use_of("ip_adapter", artifacts["ip_adapter"], theirs)))
    absent = post(api_client, acme, request(**use_of("ip_adapter", artifacts["ip_adapter"], missing)))
    assert_problem(foreign, 404, "image_not_found")
    assert foreign.text.replace(theirs, "<id>") == absent.text.replace(missing, "<id>")


def test_a_data_uri_over_the_image_cap_is_refused(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant, artifacts: dict[str, str]
) -> None:
    api_settings.max_entry_bytes = 100
    body = request(**use_of("controlnet", artifacts["controlnet"], data_uri(png((64, 64)) + bytes(200))))
    problem = assert_problem(post(api_client, acme, body), 422, "image_too_large")
    assert "/controlnet/0/image" in problem["detail"]


def test_one_bad_image_stores_none_of_the_request(
    api_client: TestClient,
    api_settings: Settings,
    acme: ApiTenant,
    artifacts: dict[str, str],
    storage: Storage,
) -> None:
    other = make_artifact(api_client, api_settings, acme, "controlnet")
    nets = [
        {"artifact_id": artifacts["controlnet"], "image": data_uri(png())},
        {"artifact_id": other, "image": data_uri(b"not an image")},
    ]
    assert_problem(post(api_client, acme, request(controlnet=nets)), 422, "unsupported_image_format")
    assert stored_images(storage, acme) == []


# --- POST /v1/images ------------------------------------------------------------------------------


def test_upload_an_image_and_read_it_back(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant, storage: Storage
) -> None:
    # A JPEG with EXIF orientation 6: stored upright as PNG, like a dataset image.
    image = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    response = upload_image(api_client, acme, out.getvalue(), name="portrait.jpg")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["object"], body["width"], body["height"]) == ("image", 20, 40)
    assert IMAGE_ID.match(body["id"])
    assert stored_images(storage, acme) == [image_key(acme.tenant_id, body["id"])]
    stored = Image.open(io.BytesIO(storage.get_bytes(image_key(acme.tenant_id, body["id"]))))
    assert (stored.format, stored.size, "exif" in stored.info) == ("PNG", (20, 40), False)

    got = api_client.get(f"/v1/images/{body['id']}", headers=acme.headers).json()
    assert (got["id"], got["width"], got["height"]) == (body["id"], 20, 40)
    assert api_client.get(got["url"], headers=acme.headers).content == storage.get_bytes(
        image_key(acme.tenant_id, body["id"])
    )
    assert_problem(api_client.get(f"/v1/images/{body['id']}", headers=globex.headers), 404, "image_not_found")
    assert_problem(api_client.get("/v1/images/img_..", headers=acme.headers), 404, "image_not_found")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"%PDF-1.7 not an image", 422, "unsupported_image_format"),
        (truncated_png(), 422, "image_corrupt"),
        (png((64, 64)) + bytes(5000), 413, "upload_too_large"),
    ],
    ids=["pdf", "truncated", "over the byte cap"],
)
def test_bad_uploads_are_refused(
    api_client: TestClient,
    api_settings: Settings,
    acme: ApiTenant,
    storage: Storage,
    data: bytes,
    status: int,
    code: str,
) -> None:
    api_settings.max_entry_bytes = 4096
    problem = assert_problem(upload_image(api_client, acme, data, name="x.png"), status, code)
    assert problem["detail"].startswith("x.png: ")
    assert stored_images(storage, acme) == []


def test_an_upload_over_the_pixel_cap_is_refused(
    api_client: TestClient, api_settings: Settings, acme: ApiTenant
) -> None:
    api_settings.max_image_pixels = 100
    assert_problem(upload_image(api_client, acme, png((11, 10))), 422, "image_too_large")


def test_images_need_a_key(api_client: TestClient) -> None:
    assert_problem(api_client.post("/v1/images", files={"file": ("a.png", png())}), 401, "unauthorized")


# --- the worker's side ------------------------------------------------------------------------------


def test_load_image_reads_only_the_tenants_own_images(
    api_client: TestClient, acme: ApiTenant, globex: ApiTenant, storage: Storage
) -> None:
    image_id = upload_image(api_client, acme, png((6, 4), BLUE)).json()["id"]
    image = load_image(image_id, acme.tenant_id, storage)
    assert (image.mode, image.size, image.getpixel((5, 3))) == ("RGB", (6, 4), BLUE)
    for ref, tenant in [(image_id, globex.tenant_id), ("../images/x", acme.tenant_id), (image_id, "..")]:
        with pytest.raises(ImageNotFound):
            load_image(ref, tenant, storage)
