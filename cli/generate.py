"""`atelier generate`: a generation request from flags, waited for, its PNGs saved.

Artifacts are named `ID[:scale]` (LoRA scale, hypernetwork strength) or `ID:IMAGE[:scale]`
(ControlNet, IP-Adapter), where IMAGE is an image id from `POST /v1/images` or a local file, which
is sent inline as a data: URI.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from typing import Any

from cli.client import AtelierClient
from cli.output import CliError, emit, say

IMAGE_ID_PREFIX = "img_"
MIME_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# Left out of the request unless given, so the server's defaults (and the base's size) apply.
OPTIONAL_FIELDS = (
    "negative_prompt",
    "steps",
    "guidance_scale",
    "seed",
    "num_images",
    "scheduler",
    "width",
    "height",
)


def image_ref(text: str) -> str:
    """An image id or data URI as given; a local file as a data: URI (other formats become PNG)."""
    if text.startswith((IMAGE_ID_PREFIX, "data:")):
        return text
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"image {text}: {exc.strerror or exc} (give a file or an img_... id)") from None
    mime = MIME_BY_SUFFIX.get(path.suffix.casefold())
    if mime is None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "png"
    return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _number(text: str, what: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CliError(f"{flag} {what}: {text!r} is not a number") from None


def scaled_use(text: str, *, flag: str, field: str = "scale") -> dict[str, Any]:
    """`ID` or `ID:scale` → {"artifact_id": ID, field: scale}."""
    artifact_id, sep, scale = text.partition(":")
    if not artifact_id:
        raise CliError(f"{flag} {text!r}: expected ID[:{field}]")
    use: dict[str, Any] = {"artifact_id": artifact_id}
    if sep:
        use[field] = _number(scale, field, flag)
    return use


def image_use(text: str, *, flag: str) -> dict[str, Any]:
    """`ID:IMAGE` or `ID:IMAGE:scale` → {"artifact_id", "image", "scale"?}."""
    artifact_id, _, rest = text.partition(":")
    if not artifact_id or not rest:
        raise CliError(f"{flag} {text!r}: expected ID:IMAGE[:scale]")
    image, sep, tail = rest.rpartition(":")
    use: dict[str, Any] = {"artifact_id": artifact_id}
    # A trailing ":number" is the scale; anything else after the id is the image (a path may hold colons).
    if sep and image and _is_number(tail):
        use["scale"] = float(tail)
    else:
        image = rest
    use["image"] = image_ref(image)
    return use


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_generation_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"base_model": args.base_model, "prompt": args.prompt}
    for key in OPTIONAL_FIELDS:
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.lora:
        body["loras"] = [scaled_use(t, flag="--lora") for t in args.lora]
    if args.textual_inversion:
        body["textual_inversions"] = [{"artifact_id": t} for t in args.textual_inversion]
    if args.hypernetwork:
        body["hypernetwork"] = scaled_use(args.hypernetwork, flag="--hypernetwork", field="strength")
    if args.dreambooth:
        body["dreambooth"] = {"artifact_id": args.dreambooth}
    if args.controlnet:
        body["controlnet"] = [image_use(t, flag="--controlnet") for t in args.controlnet]
    if args.ip_adapter:
        body["ip_adapter"] = image_use(args.ip_adapter, flag="--ip-adapter")
    return body


def run_generate(args: argparse.Namespace, client: AtelierClient) -> int:
    generation = client.generate(build_generation_body(args))
    say(f"generation {generation['id']} queued (seed {generation['request'].get('seed')})")
    generation = client.wait_generation(generation["id"], timeout_s=args.timeout)
    if generation["status"] != "succeeded":
        error = generation.get("error") or {}
        reason = f"{error.get('code')}: {error.get('message')}"
        say(f"generation {generation['id']} {generation['status']}: {reason}")
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for image in generation["images"]:
        path = out / f"{generation['id']}-{image['index']}.png"
        path.write_bytes(client.fetch(image["url"]))
        emit(str(path))
    return 0


def add_generate_parser(
    sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    gen = sub.add_parser("generate", parents=parents, help="generate images with a base and artifacts")
    gen.add_argument("--base-model", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--lora", action="append", metavar="ID[:SCALE]", help="repeatable")
    gen.add_argument("--textual-inversion", action="append", metavar="ID", help="repeatable")
    gen.add_argument("--hypernetwork", metavar="ID[:STRENGTH]")
    gen.add_argument("--dreambooth", metavar="ID")
    gen.add_argument(
        "--controlnet", action="append", metavar="ID:IMAGE[:SCALE]", help="IMAGE: a file or img_ id"
    )
    gen.add_argument("--ip-adapter", metavar="ID:IMAGE[:SCALE]", help="IMAGE: a file or img_ id")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--seed", type=int, help="image i uses seed + i")
    gen.add_argument("--num-images", type=int)
    gen.add_argument("--scheduler", help="ddim, euler, euler_a or dpmpp_2m (default: the base's)")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("-o", "--output", default=".", help="folder for the PNGs (default: here)")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the images")
    gen.set_defaults(http=run_generate)
    return gen
