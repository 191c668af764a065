"""One dataset file at a time: images become clean RGB PNGs, captions clean text.

Follows reliability.md C.4 "Images": an allow-list of formats, the pixel cap checked from the header
before anything is decoded, verify() and then a full decode with truncated images refused, EXIF
orientation applied, and a re-encode that drops metadata and any payload trailing the image.
"""

from __future__ import annotations

import io
import posixpath
import unicodedata
from typing import Literal

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Formats people try; named so the report says "format" instead of "unknown file".
REFUSED_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".svg", ".ico", ".jxl")
CAPTION_SUFFIX = ".txt"
# Bidi overrides and isolates can make a caption display differently from what it says.
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))

FileKind = Literal["image", "caption", "other"]


class FileProblem(Exception):
    """One file is unusable; the upload goes on without it."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def kind_of(name: str) -> FileKind:
    suffix = posixpath.splitext(name)[1].casefold()
    if suffix == CAPTION_SUFFIX:
        return "caption"
    if suffix in IMAGE_SUFFIXES or suffix in REFUSED_IMAGE_SUFFIXES:
        return "image"
    return "other"


def normalise_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """The file as an upright RGB image without metadata, or FileProblem saying why not."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide switch; with it on, a truncated file would pass as a valid image.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; dataset validation needs it off")
    _probe(data, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except MemoryError:
        raise
    except Exception as exc:
        # Decoders raise many types on hostile input (OSError, struct.error, IndexError ...);
        # any of them means the file is not a usable image.
        raise FileProblem("image_corrupt", f"the image cannot be decoded ({exc})") from None


def _probe(data: bytes, *, max_pixels: int) -> None:
    """Check format, size and frame count from the header, then the file's structure."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            width, height = im.size  # from the header: no pixel is decoded yet
            if width * height > max_pixels:
                raise FileProblem(
                    "image_too_large",
                    f"{width}x{height} is {width * height} pixels; the limit is {max_pixels}",
                )
            # MPO is a JPEG with previews or depth maps appended; its first frame is the photo.
            if getattr(im, "is_animated", False) and im.format != "MPO":
                raise FileProblem(
                    "unsupported_image_format", "animated or multi-frame images are not accepted"
                )
            im.verify()
    except FileProblem:
        raise
    except UnidentifiedImageError:
        raise FileProblem("unsupported_image_format", "the file is not a PNG, JPEG or WEBP image") from None
    except Image.DecompressionBombError as exc:
        raise FileProblem("image_too_large", f"the image is too large to decode ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise FileProblem("image_corrupt", f"the image is damaged ({exc})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "I" or im.mode.startswith("I;16"):
        # A plain convert clips 16-bit greyscale to white; scale it to 8 bits instead.
        im = im.convert("I").point(lambda v: v / 257).convert("L")
    elif im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # Fully transparent pixels hold arbitrary colours; show what a viewer shows, on white.
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = im.convert("RGB")
    # EXIF, text chunks and the source ICC profile (wrong after conversion) must not be re-encoded.
    rgb.info = {}
    return rgb


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    # Ingestion runs inside the upload request: fast compression beats a few percent of size.
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def decode_caption(data: bytes, *, max_bytes: int) -> str | None:
    """Caption text on one line with control characters removed; None when it is empty."""
    if len(data) > max_bytes:
        raise FileProblem("caption_invalid", f"the caption is over the limit of {max_bytes} bytes")
    if b"\0" in data:
        raise FileProblem("caption_invalid", "the caption contains NUL bytes (UTF-16? save it as UTF-8)")
    try:
        text = data.decode("utf-8-sig")  # a BOM is still UTF-8, as Windows editors write it
    except UnicodeDecodeError as exc:
        raise FileProblem("caption_invalid", f"the caption is not valid UTF-8 (byte {exc.start})") from None
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text if ch not in _BIDI_CONTROLS)
    return " ".join(text.split()) or None
