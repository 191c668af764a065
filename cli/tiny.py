"""`atelier tiny build NAME --out DIR` (the recipe of the shipped built-in bases) and `atelier tiny
check` (the shipped files against their checksums)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def add_tiny_parser(sub: argparse._SubParsersAction) -> None:
    from core.bases.tiny import NAMES

    tiny = sub.add_parser("tiny", help="the built-in tiny bases: rebuild one by its recipe, check them")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", required=True)
    build = tiny_sub.add_parser("build", help="build a tiny base into an empty folder (minutes, one core)")
    build.add_argument("name", choices=NAMES)
    build.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    build.add_argument("--vae-dir", type=Path, help="tiny-sdxl: reuse this built tiny-sd's vae/ (as shipped)")
    check = tiny_sub.add_parser("check", help="compare a folder (default: the shipped ones) to SHA256SUMS")
    check.add_argument("folders", type=Path, nargs="*")
    tiny.set_defaults(func=run_tiny_command)


def run_tiny_command(args: argparse.Namespace) -> int:
    if args.tiny_command == "build":
        return _build(args.name, args.out, args.vae_dir)
    return _check(args.folders)


def _build(name: str, out: Path, vae_dir: Path | None) -> int:
    from core.bases.tiny.build import build_pinned

    if out.exists() and any(out.iterdir()):
        print(f"atelier: {out} is not empty", file=sys.stderr)
        return 2

    def report(done: int, total: int) -> None:
        print(f"\rbuilding {name}: {done}/{total} pre-training steps", end="", file=sys.stderr, flush=True)

    timings = build_pinned(name, out, vae_dir=vae_dir, on_progress=report)
    print(file=sys.stderr)
    write_sums(out)
    print(f"built {name} into {out} in {timings['total_s']:.0f} s; checksums in {out / 'SHA256SUMS'}")
    return 0


def file_sums(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write_sums(folder: Path) -> None:
    lines = [f"{digest}  {name}\n" for name, digest in file_sums(folder).items()]
    (folder / "SHA256SUMS").write_text("".join(lines))


def read_sums(folder: Path) -> dict[str, str]:
    pairs = (line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines() if line)
    return {name: digest for digest, name in pairs}


def _check(folders: list[Path]) -> int:
    from core.bases.tiny import NAMES, shipped_folder

    failed = 0
    for folder in folders or [shipped_folder(name) for name in NAMES]:
        expected, found = read_sums(folder), file_sums(folder)
        if expected == found:
            print(f"{folder}: {len(found)} files match SHA256SUMS")
            continue
        failed += 1
        for name in sorted(set(expected) | set(found)):
            if expected.get(name) != found.get(name):
                print(f"{folder}: {name} differs", file=sys.stderr)
    return 1 if failed else 0
