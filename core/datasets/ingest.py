"""Datasets: an upload becomes normalised images plus `dataset.json` in storage (design.md §9).

The upload is one zip or several files (images and same-name `.txt` captions). Files with a problem
are reported and left out; a hostile or oversized upload is refused whole (DatasetRejected) and
nothing it wrote stays in storage. Images are stored at generated keys
`{prefix}/images/{index:05d}.png`, never under the user's names, and `{prefix}/dataset.json` is
written last, so a reader sees a complete dataset or none.

ControlNet datasets add conditioning images: `<root>/conditioning/x.png` belongs to the image
`<root>/images/x.*` (or `<root>/x.*`) and is stored at `{prefix}/conditioning/{index:05d}.png` with
that image's index. Conditioning files are read after every other file, so the image they belong
to has already been accepted or rejected when they arrive; nothing is held back in memory.
"""

from __future__ import annotations

import json
import logging
import posixpath
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO, NamedTuple

from PIL import Image

from core.config import Settings
from core.datasets.archive import (
    SNIFF_BYTES,
    DatasetRejected,
    check_entry_name,
    is_archive_name,
    iter_zip,
    read_capped,
    seekable_upload,
)
from core.datasets.images import FileProblem, decode_caption, encode_png, kind_of, normalise_image
from core.storage.base import Storage, StorageError

__all__ = [
    "AcceptedImage",
    "DatasetItem",
    "DatasetRejected",
    "RejectedFile",
    "ValidationReport",
    "ingest_upload",
    "load_items",
]

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
# Version 1 manifests written before conditioning images existed simply lack the "conditioning" key.
MANIFEST_VERSION = 1
CONDITIONING_FOLDER = "conditioning"
IMAGES_FOLDER = "images"
# Training resizes a conditioning image to its image's size; only the shape has to agree.
ASPECT_TOLERANCE = 0.01


@dataclass
class AcceptedImage:
    name: str  # the user's file name, for the report only
    key: str  # storage key of the normalised PNG
    width: int
    height: int
    caption: str | None
    conditioning: str | None = None  # storage key of the conditioning PNG (ControlNet)


@dataclass
class RejectedFile:
    name: str
    code: str
    reason: str


@dataclass
class ValidationReport:
    accepted: list[AcceptedImage]
    rejected: list[RejectedFile]
    stored_bytes: int = 0  # what the dataset's objects take in storage (the tenant's quota)

    def to_dict(self) -> dict[str, Any]:
        sizes = Counter((a.width, a.height) for a in self.accepted)
        by_area = sorted(sizes, key=lambda s: s[0] * s[1])
        return {
            "counts": {
                "accepted": len(self.accepted),
                "rejected": len(self.rejected),
                "captioned": sum(a.caption is not None for a in self.accepted),
                "conditioned": sum(a.conditioning is not None for a in self.accepted),
            },
            "accepted": [
                {
                    "name": a.name,
                    "width": a.width,
                    "height": a.height,
                    "caption": a.caption,
                    "conditioning": a.conditioning is not None,
                }
                for a in self.accepted
            ],
            "rejected": [{"name": r.name, "code": r.code, "reason": r.reason} for r in self.rejected],
            "resolutions": {
                "smallest": _size_dict(by_area[0]) if by_area else None,
                "largest": _size_dict(by_area[-1]) if by_area else None,
                "most_common": [_size_dict(s) | {"count": n} for s, n in sizes.most_common(10)],
            },
        }


@dataclass
class DatasetItem:
    image: Image.Image  # RGB
    caption: str | None
    name: str
    conditioning: Image.Image | None = None  # RGB, same aspect ratio as image (ControlNet)


def ingest_upload(
    files: list[tuple[str, BinaryIO]], *, dataset_prefix: str, storage: Storage, settings: Settings
) -> ValidationReport:
    """Validate and store an upload: one zip, or images and captions as separate files.

    Raises DatasetRejected when the whole upload is refused; everything written is removed first.
    """
    prefix = _clean_prefix(dataset_prefix)
    if storage.list(f"{prefix}/"):
        raise ValueError(f"dataset prefix {prefix!r} is not empty")
    builder = _DatasetBuilder(prefix=prefix, storage=storage, settings=settings)
    try:
        for name, data in _members(files, settings):
            builder.add(name, data)
        if builder.files_seen == 0:
            if len(files) == 1:
                raise DatasetRejected.for_file("empty_dataset", files[0][0], "the archive contains no files")
            raise DatasetRejected("empty_dataset", "the upload contains no files")
        return builder.finish()
    except BaseException:
        builder.discard()
        raise


def load_items(*, storage: Storage, dataset_prefix: str) -> list[DatasetItem]:
    """The stored dataset's images (RGB), captions and conditioning images, in upload order."""
    prefix = _clean_prefix(dataset_prefix)
    manifest = json.loads(storage.get_bytes(f"{prefix}/{MANIFEST}"))
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{prefix}/{MANIFEST}: unknown version {manifest.get('version')!r}")

    def read(key: str, folder: str) -> Image.Image:
        # The manifest is ours, but it must never lead a job to read another dataset's objects.
        if not key.startswith(f"{prefix}/{folder}/") or ".." in key.split("/"):
            raise ValueError(f"{prefix}/{MANIFEST}: key {key!r} is outside the dataset")
        with Image.open(BytesIO(storage.get_bytes(key)), formats=["PNG"]) as im:
            return im.convert("RGB")

    items = []
    for entry in manifest["items"]:
        conditioning = entry.get("conditioning")
        items.append(
            DatasetItem(
                image=read(entry["key"], IMAGES_FOLDER),
                caption=entry["caption"],
                name=entry["name"],
                conditioning=read(conditioning, CONDITIONING_FOLDER) if conditioning else None,
            )
        )
    return items


def _members(files: list[tuple[str, BinaryIO]], settings: Settings) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) for every file of the upload, checked against the upload-wide caps."""
    sized: list[tuple[str, BinaryIO, int]] = []
    total = 0
    for name, f in files:
        stream, size = seekable_upload(f, limit=settings.max_upload_bytes - total)
        sized.append((name, stream, size))
        total += size
        if total > settings.max_upload_bytes:
            reason = f"the upload is over the limit of {settings.max_upload_bytes} bytes"
            if len(files) == 1:
                raise DatasetRejected.for_file("upload_too_large", name, reason, status=413)
            raise DatasetRejected("upload_too_large", reason, status=413)

    def read_limit(name: str) -> int:
        kind = kind_of(name)
        if kind == "caption":
            return settings.max_caption_bytes
        return settings.max_entry_bytes if kind == "image" else SNIFF_BYTES

    if len(sized) == 1 and sized[0][0].casefold().endswith(".zip"):
        name, stream, size = sized[0]
        yield from iter_zip(
            stream,
            archive_name=name,
            size=size,
            settings=settings,
            read_limit=read_limit,
            later=_is_conditioning,
        )
        return
    if len(sized) > settings.max_archive_entries:
        raise DatasetRejected(
            "too_many_entries", f"{len(sized)} files; the limit is {settings.max_archive_entries}"
        )
    # Every file is spooled already, so conditioning images can wait until their images are in.
    for name, stream, _ in sorted(sized, key=lambda s: _is_conditioning(s[0])):
        check_entry_name(name)
        yield name, read_capped(stream, read_limit(name))


class _Caption(NamedTuple):
    name: str
    text: str | None


class _DatasetBuilder:
    """Collects one upload's files: images are stored as they arrive, captions paired at the end."""

    def __init__(self, *, prefix: str, storage: Storage, settings: Settings) -> None:
        self.prefix = prefix
        self.storage = storage
        self.settings = settings
        self.files_seen = 0
        self.accepted: list[AcceptedImage] = []
        self.rejected: list[RejectedFile] = []
        self.images: dict[str, AcceptedImage] = {}  # folded stem -> image
        self.captions: dict[str, _Caption] = {}  # folded stem -> caption
        self.conditioned_by: dict[str, str] = {}  # image key -> the conditioning file's name
        self.written: list[str] = []
        self.stored_bytes = 0

    def add(self, name: str, data: bytes) -> None:
        self.files_seen += 1
        kind = kind_of(name)
        if kind == "other":
            self._reject(name, "unsupported_file", _unsupported_reason(name))
            return
        if kind == "image" and _is_conditioning(name):
            self._add_conditioning(name, data)
            return
        stem = _fold(posixpath.splitext(name)[0])
        # Captions pair by stem, so two images may not differ only by case or extension.
        first = (self.images if kind == "image" else self.captions).get(stem)
        if first is not None:
            reason = f"clashes with {first.name!r} (names are compared ignoring case and the image extension)"
            self._reject(name, "duplicate_name", reason)
            return
        try:
            if kind == "caption":
                text = decode_caption(data, max_bytes=self.settings.max_caption_bytes)
                self.captions[stem] = _Caption(name=name, text=text)
            else:
                self.images[stem] = self._store_image(name, data)
        except FileProblem as problem:
            self._reject(name, problem.code, problem.reason)

    def finish(self) -> ValidationReport:
        for stem, caption in self.captions.items():
            if stem in self.images:
                self.images[stem].caption = caption.text
            else:
                reason = "no image has the same name as this caption"
                self._reject(caption.name, "caption_without_image", reason)
        if not self.accepted:
            errors = [{"file": r.name, "code": r.code, "reason": r.reason} for r in self.rejected]
            raise DatasetRejected("no_valid_images", "the upload has no usable image", errors=errors)
        manifest = {
            "version": MANIFEST_VERSION,
            "items": [
                {
                    "key": a.key,
                    "name": a.name,
                    "caption": a.caption,
                    "width": a.width,
                    "height": a.height,
                    "conditioning": a.conditioning,
                }
                for a in self.accepted
            ],
        }
        self._put(f"{self.prefix}/{MANIFEST}", json.dumps(manifest).encode(), "application/json")
        log.info(
            "dataset stored",
            extra={
                "dataset_prefix": self.prefix,
                "accepted": len(self.accepted),
                "rejected": len(self.rejected),
            },
        )
        return ValidationReport(
            accepted=self.accepted, rejected=self.rejected, stored_bytes=self.stored_bytes
        )

    def discard(self) -> None:
        """Remove what this upload wrote; best effort, so the original error is what surfaces."""
        for key in self.written:
            try:
                self.storage.delete(key)
            except StorageError:
                log.warning("dataset cleanup failed", extra={"dataset_prefix": self.prefix, "key": key})

    def _add_conditioning(self, name: str, data: bytes) -> None:
        places = _image_stems(posixpath.splitext(name)[0])
        image = next((self.images[s] for s in map(_fold, places) if s in self.images), None)
        if image is None:
            reason = f"no accepted image has the same name (looked for {places[0]}.* and {places[1]}.*)"
            self._reject(name, "conditioning_without_image", reason)
            return
        first = self.conditioned_by.get(image.key)
        if first is not None:
            reason = f"clashes with {first!r}: {image.name!r} already has a conditioning image"
            self._reject(name, "duplicate_name", reason)
            return
        try:
            conditioning = self._normalise(data)
            if not _same_aspect(conditioning.size, (image.width, image.height)):
                raise FileProblem(
                    "conditioning_size_mismatch",
                    f"{conditioning.width}x{conditioning.height} does not have the aspect ratio of "
                    f"its image {image.name!r} ({image.width}x{image.height})",
                )
        except FileProblem as problem:
            self._reject(name, problem.code, problem.reason)
            return
        key = f"{self.prefix}/{CONDITIONING_FOLDER}/{posixpath.basename(image.key)}"
        self._put(key, encode_png(conditioning), "image/png")
        image.conditioning = key
        self.conditioned_by[image.key] = name

    def _normalise(self, data: bytes) -> Image.Image:
        if len(data) > self.settings.max_entry_bytes:
            raise FileProblem("image_too_large", f"the file is over {self.settings.max_entry_bytes} bytes")
        return normalise_image(data, max_pixels=self.settings.max_image_pixels)

    def _store_image(self, name: str, data: bytes) -> AcceptedImage:
        image = self._normalise(data)
        key = f"{self.prefix}/{IMAGES_FOLDER}/{len(self.accepted):05d}.png"
        self._put(key, encode_png(image), "image/png")
        accepted = AcceptedImage(name=name, key=key, width=image.width, height=image.height, caption=None)
        self.accepted.append(accepted)
        return accepted

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        self.written.append(key)  # before the write: a failed put may still leave an object
        self.storage.put_bytes(key, data, content_type=content_type)
        self.stored_bytes += len(data)

    def _reject(self, name: str, code: str, reason: str) -> None:
        self.rejected.append(RejectedFile(name=name, code=code, reason=reason))


def _is_conditioning(name: str) -> bool:
    """An image inside a folder named `conditioning` (any case) is a ControlNet conditioning image."""
    parts = name.split("/")
    return len(parts) > 1 and kind_of(name) == "image" and _fold(parts[-2]) == CONDITIONING_FOLDER


def _image_stems(conditioning_stem: str) -> tuple[str, str]:
    """Where the image of `<root>/conditioning/x` may be: `<root>/images/x`, then `<root>/x`."""
    parts = conditioning_stem.split("/")
    root = "".join(f"{p}/" for p in parts[:-2])
    return f"{root}{IMAGES_FOLDER}/{parts[-1]}", f"{root}{parts[-1]}"


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] / (a[1] * b[0]) - 1) <= ASPECT_TOLERANCE


def _unsupported_reason(name: str) -> str:
    if is_archive_name(name):
        return "archives are accepted only as a single .zip upload"
    return "only PNG, JPEG or WEBP images and .txt captions are accepted"


def _fold(name: str) -> str:
    # Case-fold between two NFC passes: folding can itself produce unnormalised sequences.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _size_dict(size: tuple[int, int]) -> dict[str, int]:
    return {"width": size[0], "height": size[1]}


def _clean_prefix(dataset_prefix: str) -> str:
    prefix = dataset_prefix.strip("/")
    if not prefix:
        raise ValueError("dataset_prefix must not be empty")
    return prefix
