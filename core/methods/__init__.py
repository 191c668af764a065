"""The closed registry of training methods.

Names map to (module, class) inside this package; nothing is imported from a user-given path, and a
method's torch-heavy module is imported only when the method is first used, so the API can list
methods without the ML stack.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.methods.base import Method

_REGISTRY: dict[str, tuple[str, str]] = {
    "lora": ("core.methods.lora", "LoraMethod"),
    "dreambooth": ("core.methods.dreambooth", "DreamBoothMethod"),
    "textual_inversion": ("core.methods.textual_inversion", "TextualInversionMethod"),
    "hypernetwork": ("core.methods.hypernetwork", "HypernetworkMethod"),
    "controlnet": ("core.methods.controlnet", "ControlNetMethod"),
    "ip_adapter": ("core.methods.ip_adapter", "IPAdapterMethod"),
    "hyper_lora": ("core.methods.hyper_lora", "HyperLoraMethod"),
}


class UnknownMethod(KeyError):
    pass


def method_names() -> list[str]:
    return sorted(_REGISTRY)


@functools.cache
def get_method(name: str) -> Method:
    try:
        module_name, class_name = _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; known: {', '.join(method_names())}") from None
    return getattr(importlib.import_module(module_name), class_name)()
