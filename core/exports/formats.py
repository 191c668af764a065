"""Which export formats each method offers (torch-free: the API validates `?format=` with it).

Exports are written by the worker when the artifact is made, under `exports/<format>/` beside the
primary (diffusers) files, hashed in the manifest like every other file, and listed in the
manifest's `exports: {format: [file names]}`. Aliases name the tool a user has in mind.
"""

from __future__ import annotations

PRIMARY = "diffusers"

# method -> format -> what a user gets
FORMATS: dict[str, dict[str, str]] = {
    "lora": {
        "kohya": "kohya/A1111/ComfyUI LoRA .safetensors (lora_unet_*, lora_te*_*, alpha, ss_* metadata)"
    },
    "textual_inversion": {"a1111": "A1111/ComfyUI embedding .safetensors (emb_params, or clip_l + clip_g)"},
    "hypernetwork": {"a1111": "A1111 hypernetwork .pt (plain types only: torch.load(weights_only=True))"},
    "controlnet": {"single_file": "one ControlNet .safetensors for ComfyUI/Forge/A1111 models folders"},
    "dreambooth": {"single_file": "single-file checkpoint in the original Stable Diffusion key layout"},
    "ip_adapter": {"bin": "IP-Adapter .bin {'image_proj': ..., 'ip_adapter': ...}"},
}

ALIASES: dict[str, dict[str, str]] = {
    "lora": {"a1111": "kohya", "comfyui": "kohya"},
    "textual_inversion": {"kohya": "a1111", "comfyui": "a1111"},
    "hypernetwork": {"comfyui": "a1111"},
    "controlnet": {"a1111": "single_file", "comfyui": "single_file"},
    "dreambooth": {"a1111": "single_file", "comfyui": "single_file"},
    # The primary ip_adapter.safetensors is already what ComfyUI and diffusers load.
    "ip_adapter": {"safetensors": PRIMARY, "comfyui": PRIMARY},
}


class UnknownFormat(ValueError):
    pass


def resolve_format(method: str, requested: str) -> str:
    """The canonical format name for `requested`, or UnknownFormat naming what is offered."""
    requested = requested.lower()
    if requested == PRIMARY:
        return PRIMARY
    offered = FORMATS.get(method, {})
    canonical = ALIASES.get(method, {}).get(requested, requested)
    if canonical == PRIMARY or canonical in offered:
        return canonical
    names = sorted({PRIMARY, *offered, *ALIASES.get(method, {})})
    raise UnknownFormat(f"a {method} artifact is offered as {', '.join(names)}; not {requested!r}")
