"""Dataset ingestion: good uploads round-trip, bad files are reported, hostile uploads leave nothing.

Every bad input is built here, in memory, so each test shows exactly what it sends.
"""

from __future__ import annotations

import io
import json
import random
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from core.config import Settings
from core.datasets.ingest import DatasetRejected, ValidationReport, ingest_upload, load_items
from core.storage.local import LocalStorage

PREFIX = "tenants/t1/datasets/ds1"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def png(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def noisy(image_format: str, size: tuple[int, int] = (64, 64)) -> bytes:
    """Random pixels, so that cutting the file in half cuts into the pixel data."""
    rng = random.Random(0)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: nothing that big exists."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def make_zip(entries: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return out.getvalue()


def ingest(files: dict[str, bytes], storage: LocalStorage, settings: Settings) -> ValidationReport:
    uploads = [(name, io.BytesIO(data)) for name, data in files.items()]
    return ingest_upload(uploads, dataset_prefix=PREFIX, storage=storage, settings=settings)


def refused(files: dict[str, bytes], storage: LocalStorage, settings: Settings) -> DatasetRejected:
    """Ingest an upload that must be refused whole; check that it left nothing in storage."""
    with pytest.raises(DatasetRejected) as caught:
        ingest(files, storage, settings)
    assert storage.list(PREFIX) == []
    return caught.value


def assert_names(error: DatasetRejected, code: str, name: str) -> None:
    assert error.code == code
    assert name in error.detail
    assert any(e["file"] == name and e["code"] == code and e["reason"] for e in error.errors)


def rejected_pairs(report: ValidationReport) -> list[tuple[str, str]]:
    return [(r.name, r.code) for r in report.rejected]


# --- good uploads -------------------------------------------------------------------------------


def test_zip_round_trip_through_load_items(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip(
        {"cats/cat1.png": png((8, 6)), "cats/cat1.txt": b"a red cat\n", "dog.jpg": noisy("JPEG")}
    )
    report = ingest({"photos.zip": upload}, storage, settings)

    assert [(a.name, a.width, a.height, a.caption) for a in report.accepted] == [
        ("cats/cat1.png", 8, 6, "a red cat"),
        ("dog.jpg", 64, 64, None),
    ]
    assert report.rejected == []
    # Keys are generated; user names never reach storage.
    assert storage.list(PREFIX) == [
        f"{PREFIX}/dataset.json",
        f"{PREFIX}/images/00000.png",
        f"{PREFIX}/images/00001.png",
    ]
    items = load_items(storage=storage, dataset_prefix=PREFIX)
    assert [(i.name, i.caption, i.image.mode, i.image.size) for i in items] == [
        ("cats/cat1.png", "a red cat", "RGB", (8, 6)),
        ("dog.jpg", None, "RGB", (64, 64)),
    ]
    assert items[0].image.getpixel((0, 0)) == (200, 30, 30)


def test_report_to_dict_is_json(storage: LocalStorage, settings: Settings) -> None:
    files = {"a.png": png((8, 6)), "a.txt": b"x", "b.png": png((8, 6)), "c.png": png((4, 4)), "d.md": b"#"}
    report = ingest(files, storage, settings).to_dict()

    assert json.loads(json.dumps(report)) == report
    assert report["counts"] == {"accepted": 3, "rejected": 1, "captioned": 1, "conditioned": 0}
    assert report["rejected"] == [
        {"name": "d.md", "code": "unsupported_file", "reason": report["rejected"][0]["reason"]}
    ]
    assert report["resolutions"] == {
        "smallest": {"width": 4, "height": 4},
        "largest": {"width": 8, "height": 6},
        "most_common": [{"width": 8, "height": 6, "count": 2}, {"width": 4, "height": 4, "count": 1}],
    }


def test_multi_file_upload_pairs_captions(storage: LocalStorage, settings: Settings) -> None:
    webp = io.BytesIO()
    Image.new("RGB", (5, 5), (0, 0, 255)).save(webp, format="WEBP")
    files = {"b.webp": webp.getvalue(), "A.png": png(), "a.TXT": "une photo d\u2019\u00e9t\u00e9".encode()}
    report = ingest(files, storage, settings)

    assert {a.name: a.caption for a in report.accepted} == {
        "b.webp": None,
        "A.png": "une photo d\u2019\u00e9t\u00e9",
    }
    assert len(load_items(storage=storage, dataset_prefix=PREFIX)) == 2


def test_exif_rotated_jpeg_comes_out_upright(storage: LocalStorage, settings: Settings) -> None:
    # Stored 40x20, left half red, right half blue; orientation 6 means "turn 90 degrees clockwise".
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    report = ingest({"portrait.jpg": out.getvalue()}, storage, settings)

    assert (report.accepted[0].width, report.accepted[0].height) == (20, 40)
    upright = load_items(storage=storage, dataset_prefix=PREFIX)[0].image
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left edge turned to the top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGBA", (10, 10, 10, 0), (255, 255, 255)),  # transparent shows the white background
        ("I;16", 32896, (128, 128, 128)),  # 16-bit grey scaled, not clipped to white
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_image_modes_become_rgb(
    mode: str, color: object, expected: tuple[int, int, int], storage: LocalStorage, settings: Settings
) -> None:
    out = io.BytesIO()
    Image.new(mode, (4, 4), color).save(out, format="JPEG" if mode == "CMYK" else "PNG")
    ingest({"x.jpg" if mode == "CMYK" else "x.png": out.getvalue()}, storage, settings)

    image = load_items(storage=storage, dataset_prefix=PREFIX)[0].image
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((1, 1)), expected, strict=True))


def test_caption_control_characters_are_stripped(storage: LocalStorage, settings: Settings) -> None:
    caption = "\ufeffa\tcat\x07 on\r\nthe mat\u202e\x1b[31m".encode()
    report = ingest({"c.png": png(), "c.txt": caption}, storage, settings)

    assert report.accepted[0].caption == "a cat on the mat [31m"


def test_macos_metadata_is_ignored(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip({"x/a.png": png(), "x/.DS_Store": b"\0\0\0\1Bud1", "__MACOSX/x/._a.png": b"\0\5\26\7"})
    report = ingest({"mac.zip": upload}, storage, settings)

    assert [a.name for a in report.accepted] == ["x/a.png"]
    assert report.rejected == []


# --- bad files are reported, good ones kept -----------------------------------------------------


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def animated_png() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="GIF")
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("page.png", b"<!doctype html><html><script>alert(1)</script></html>", "unsupported_image_format"),
        ("doc.jpg", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "unsupported_image_format"),
        ("anim.png", animated_png(), "unsupported_image_format"),
        ("old.gif", gif(), "unsupported_image_format"),
        ("cut.png", truncated(noisy("PNG")), "image_corrupt"),
        ("cut.jpg", truncated(noisy("JPEG")), "image_corrupt"),
        ("huge.png", png_claiming(7000, 7000), "image_too_large"),  # over our 40 MP cap
        ("bomb.png", png_claiming(60000, 60000), "image_too_large"),  # over Pillow's own bomb limit
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "caption_invalid"),
        ("utf16.txt", "a cat".encode("utf-16-le"), "caption_invalid"),
        ("long.txt", b"cat " * 1000, "caption_invalid"),
        ("orphan.txt", b"a caption without its image", "caption_without_image"),
        ("notes.md", b"# notes", "unsupported_file"),
        ("more.tar", b"x" * 600, "unsupported_file"),
    ],
)
def test_bad_file_is_rejected_and_the_rest_kept(
    name: str, data: bytes, code: str, storage: LocalStorage, settings: Settings
) -> None:
    # A caption under test needs its image, or it would be reported as an orphan instead.
    needs_partner = name.endswith(".txt") and code != "caption_without_image"
    partner = {name.removesuffix(".txt") + ".png": png()} if needs_partner else {}
    report = ingest({"good.png": png(), **partner, name: data}, storage, settings)

    assert rejected_pairs(report) == [(name, code)]
    assert report.rejected[0].reason
    assert len(storage.list(f"{PREFIX}/images/")) == len(report.accepted) == 1 + len(partner)


def test_mixed_zip_reports_both_and_stores_only_good(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip(
        {
            "good1.png": png(),
            "good1.txt": b"first",
            "fake.png": b"GIF89a not really",
            "cut.jpg": truncated(noisy("JPEG")),
            "good2.jpg": noisy("JPEG"),
            "bad.txt": b"\xff\xfe\xfd",
            "bad.png": png(),
        }
    )
    report = ingest({"mixed.zip": upload}, storage, settings)

    assert [(a.name, a.caption) for a in report.accepted] == [
        ("good1.png", "first"),
        ("good2.jpg", None),
        ("bad.png", None),
    ]
    assert rejected_pairs(report) == [
        ("fake.png", "unsupported_image_format"),
        ("cut.jpg", "image_corrupt"),
        ("bad.txt", "caption_invalid"),
    ]
    assert storage.list(f"{PREFIX}/images/") == [f"{PREFIX}/images/{i:05d}.png" for i in range(3)]


def test_duplicate_names_after_casefold_and_nfc(storage: LocalStorage, settings: Settings) -> None:
    upload = make_zip(
        [
            ("Cat.png", png()),
            ("cat.PNG", png()),
            ("cat.jpg", noisy("JPEG")),  # same caption stem as Cat.png
            ("caf\u00e9.png", png()),  # NFC
            ("cafe\u0301.png", png()),  # NFD: the same name
            ("CAT.txt", b"one"),
            ("cat.txt", b"two"),
        ]
    )
    report = ingest({"dups.zip": upload}, storage, settings)

    assert {a.name: a.caption for a in report.accepted} == {"Cat.png": "one", "caf\u00e9.png": None}
    assert rejected_pairs(report) == [
        ("cat.PNG", "duplicate_name"),
        ("cat.jpg", "duplicate_name"),
        ("cafe\u0301.png", "duplicate_name"),
        ("cat.txt", "duplicate_name"),
    ]
    assert "Cat.png" in report.rejected[0].reason


def test_no_valid_images_lists_every_rejected_file(storage: LocalStorage, settings: Settings) -> None:
    error = refused({"fake.png": b"not an image", "lonely.txt": b"hi"}, storage, settings)

    assert error.code == "no_valid_images"
    assert [(e["file"], e["code"]) for e in error.errors] == [
        ("fake.png", "unsupported_image_format"),
        ("lonely.txt", "caption_without_image"),
    ]


# --- hostile or oversized uploads are refused whole ---------------------------------------------


def patch_name(upload: bytes, placeholder: bytes, real: bytes) -> bytes:
    """Rename an entry in both headers: zipfile itself cannot write some hostile names."""
    assert len(placeholder) == len(real) and upload.count(placeholder) == 2
    return upload.replace(placeholder, real)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/cron.d/x",
        "/abs/path.png",
        "a\\..\\..\\b.png",
        "C:x.png",
        "ok/../../up.png",
        "__MACOSX/../../x",
    ],
)
def test_path_traversal_refuses_the_zip(name: str, storage: LocalStorage, settings: Settings) -> None:
    # The good image comes first, so the refusal must also delete what was already stored.
    upload = make_zip([("good.png", png()), (name, png())])
    assert_names(refused({"evil.zip": upload}, storage, settings), "path_traversal", name)


def test_nul_in_entry_name_is_path_traversal(storage: LocalStorage, settings: Settings) -> None:
    upload = patch_name(make_zip({"good.png": png(), "evil#.png.sh": b"x"}), b"evil#", b"evil\0")
    assert_names(refused({"nul.zip": upload}, storage, settings), "path_traversal", "evil\0.png.sh")


def test_path_traversal_in_multi_file_upload(storage: LocalStorage, settings: Settings) -> None:
    error = refused({"good.png": png(), "../../x.png": png()}, storage, settings)
    assert_names(error, "path_traversal", "../../x.png")


def test_symlink_entry_refuses_the_zip(storage: LocalStorage, settings: Settings) -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3  # Unix, so external_attr carries the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    upload = make_zip([("good.png", png()), (link, b"/etc/passwd")])
    assert_names(refused({"links.zip": upload}, storage, settings), "unsupported_entry_type", "link.png")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("inner.zip", make_zip({"a.png": png()})),
        ("sneaky.png", make_zip({"a.png": png()})),  # zip magic behind an image name
        ("sneaky.txt", make_zip({"a.png": png()})),
        ("data.bin", make_zip({"a.png": png()})),
        ("x.tar.gz", b"\x1f\x8b\x08\x00"),
    ],
)
def test_nested_archive_refuses_the_zip(
    name: str, data: bytes, storage: LocalStorage, settings: Settings
) -> None:
    upload = make_zip([("good.png", png()), (name, data)])
    assert_names(refused({"outer.zip": upload}, storage, settings), "nested_archive", name)


def zeros_zip(name: str, size: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", png())
        with zf.open(name, "w") as entry:
            for _ in range(size // (1 << 20)):
                entry.write(bytes(1 << 20))
    return out.getvalue()


def test_zip_bomb_is_stopped_while_streaming(storage: LocalStorage, settings: Settings) -> None:
    settings.max_entry_bytes = 2 << 20
    settings.max_compression_ratio = 1e9  # so the byte counter, not the ratio, stops it
    upload = zeros_zip("bomb.png", 32 << 20)
    assert len(upload) < 1 << 20
    error = refused({"bomb.zip": upload}, storage, settings)
    assert_names(error, "archive_too_large", "bomb.png")
    assert str(2 << 20) in error.detail


def test_compression_ratio_cap(storage: LocalStorage, settings: Settings) -> None:
    error = refused({"ratio.zip": zeros_zip("zeros.png", 4 << 20)}, storage, settings)
    assert_names(error, "archive_too_large", "zeros.png")
    assert "200:1" in error.detail


def test_total_expanded_bytes_cap(storage: LocalStorage, settings: Settings) -> None:
    settings.max_archive_bytes = 1 << 20
    rng = random.Random(1)
    upload = make_zip({f"noise{i}.png": rng.randbytes(400_000) for i in range(3)})
    assert_names(refused({"big.zip": upload}, storage, settings), "archive_too_large", "noise2.png")


def test_too_many_entries(storage: LocalStorage, settings: Settings) -> None:
    settings.max_archive_entries = 3
    upload = make_zip({f"{i}.png": png() for i in range(4)})
    assert_names(refused({"many.zip": upload}, storage, settings), "too_many_entries", "many.zip")


def test_too_many_entries_counted_when_the_directory_lies(storage: LocalStorage, settings: Settings) -> None:
    settings.max_archive_entries = 3
    upload = bytearray(make_zip({f"{i}.png": png() for i in range(4)}))
    eocd = upload.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", upload, eocd + 8, 1, 1)  # declare one entry; four are there
    assert_names(refused({"liar.zip": bytes(upload)}, storage, settings), "too_many_entries", "3.png")


def test_too_many_files_in_multi_file_upload(storage: LocalStorage, settings: Settings) -> None:
    settings.max_archive_entries = 2
    error = refused({f"{i}.png": png() for i in range(3)}, storage, settings)
    assert error.code == "too_many_entries"


@pytest.mark.parametrize("entries", [{}, {"__MACOSX/._a.png": b"\0", "empty/": b"", ".DS_Store": b"\0"}])
def test_empty_zip(entries: dict[str, bytes], storage: LocalStorage, settings: Settings) -> None:
    assert_names(refused({"empty.zip": make_zip(entries)}, storage, settings), "empty_dataset", "empty.zip")


def test_not_a_zip(storage: LocalStorage, settings: Settings) -> None:
    error = refused({"photos.zip": png()}, storage, settings)
    assert_names(error, "not_an_archive", "photos.zip")


def test_upload_too_large_is_413(storage: LocalStorage, settings: Settings) -> None:
    settings.max_upload_bytes = 1000
    error = refused({"a.png": png((64, 64)), "b.jpg": noisy("JPEG")}, storage, settings)
    assert (error.code, error.status) == ("upload_too_large", 413)


def test_prefix_must_be_empty(storage: LocalStorage, settings: Settings) -> None:
    ingest({"a.png": png()}, storage, settings)
    with pytest.raises(ValueError, match="not empty"):
        ingest({"b.png": png()}, storage, settings)


def test_refuses_to_validate_with_truncated_loading_on(
    storage: LocalStorage, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The switch is process-wide; with it on, truncated files would pass validation.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ingest({"a.png": png(), "b.png": png()}, storage, settings)
    assert storage.list(PREFIX) == []
