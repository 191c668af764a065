"""Images a generation uses (ControlNet conditioning, IP-Adapter reference), stored per tenant.

Uploads to `POST /v1/images` and data URIs in `POST /v1/generations` both come through here: checked
and normalised exactly like dataset images (core.datasets.images: format allow-list, pixel cap before
decode, EXIF orientation, RGB, metadata dropped) and stored as PNG at
`tenants/{tenant}/images/{id}.png`. The key is built from a validated id, never from user text, and
always under the caller's tenant, so one tenant's id can never reach another's image.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from PIL import Image

from core.config import Settings
from core.datasets.archive import read_capped, seekable_upload
from core.datasets.images import FileProblem, encode_png, normalise_image
from core.generation.params import DATA_URI, IMAGE_ID
from core.ids import new_id
from core.storage.base import ObjectNotFound, Storage

__all__ = [
    "FileProblem",
    "ImageNotFound",
    "StoredImage",
    "attempt_prefix",
    "decode_data_uri",
    "generation_prefix",
    "image_exists",
    "image_info",
    "image_key",
    "load_image",
    "read_upload",
    "store_image",
]


class ImageNotFound(LookupError):
    """No such image for this tenant (another tenant's id looks exactly like a missing one)."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"no image with id {image_id!r}")
        self.image_id = image_id


@dataclass(frozen=True)
class StoredImage:
    id: str
    width: int
    height: int


def image_key(tenant_id: str, image_id: str) -> str:
    if not IMAGE_ID.match(image_id):
        raise ValueError(f"{image_id!r} is not an image id")
    if not tenant_id or "/" in tenant_id or tenant_id in (".", ".."):
        raise ValueError(f"{tenant_id!r} is not a tenant id")
    return f"tenants/{tenant_id}/images/{image_id}.png"


def generation_prefix(tenant_id: str, generation_id: str) -> str:
    """Where a generation's output images go."""
    return f"tenants/{tenant_id}/generations/{generation_id}"


def attempt_prefix(tenant_id: str, generation_id: str, attempt: int) -> str:
    """Where one attempt stores its images: an attempt that lost its lease removes its own folder,
    never the images of the attempt that took over."""
    return f"{generation_prefix(tenant_id, generation_id)}/attempt-{attempt}"


def read_upload(stream: BinaryIO, *, settings: Settings) -> Image.Image:
    """One uploaded file as a normalised RGB image, or FileProblem saying why not (code
    `upload_too_large` when the file is over the per-image byte cap)."""
    cap = settings.max_entry_bytes
    stream, size = seekable_upload(stream, limit=cap)
    if size > cap:
        raise FileProblem("upload_too_large", f"the file is over the limit of {cap} bytes")
    return normalise_image(read_capped(stream, cap), max_pixels=settings.max_image_pixels)


def decode_data_uri(uri: str, *, settings: Settings) -> Image.Image:
    """A `data:image/png|jpeg|webp;base64,...` URI as a normalised RGB image, or FileProblem."""
    match = DATA_URI.match(uri)
    if match is None:
        raise FileProblem("invalid_data_uri", "expected data:image/png|jpeg|webp;base64,...")
    payload = uri[match.end() :]
    cap = settings.max_entry_bytes
    # Judge the size from the text before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) > 4 * -(-cap // 3):
        raise FileProblem("image_too_large", f"the image is over the limit of {cap} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FileProblem("invalid_data_uri", f"the base64 payload is malformed ({exc})") from None
    return normalise_image(data, max_pixels=settings.max_image_pixels)


def store_image(image: Image.Image, *, tenant_id: str, storage: Storage) -> StoredImage:
    image_id = new_id("img")
    storage.put_bytes(image_key(tenant_id, image_id), encode_png(image), content_type="image/png")
    return StoredImage(id=image_id, width=image.width, height=image.height)


def image_exists(image_id: str, tenant_id: str, storage: Storage) -> bool:
    try:
        return storage.exists(image_key(tenant_id, image_id))
    except ValueError:
        return False


def _read(image_id: str, tenant_id: str, storage: Storage) -> Image.Image:
    try:
        key = image_key(tenant_id, image_id)
        data = storage.get_bytes(key)
    except (ValueError, ObjectNotFound):
        raise ImageNotFound(image_id) from None
    # Only our own re-encoded PNGs live under this key; anything else is not an image of ours.
    return Image.open(BytesIO(data), formats=["PNG"])


def image_info(image_id: str, tenant_id: str, storage: Storage) -> StoredImage:
    """Id and size of a stored image (from the PNG header); ImageNotFound if it is not the tenant's."""
    with _read(image_id, tenant_id, storage) as im:
        return StoredImage(id=image_id, width=im.width, height=im.height)


def load_image(ref_id: str, tenant_id: str, storage: Storage) -> Image.Image:
    """The stored image `ref_id` of `tenant_id` as PIL RGB, for the generate worker.

    Raises ImageNotFound when the id is malformed or the tenant has no such image.
    """
    with _read(ref_id, tenant_id, storage) as im:
        return im.convert("RGB")
