"""The closed registry of training methods: core.spec.catalogue names each method's class.

Nothing is imported from a user-given path (only the catalogue's own "module:Class" strings), and a
method's torch-heavy module is imported only when the method is first used, so the API can list
methods without the ML stack.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from core.spec.catalogue import CATALOGUE

if TYPE_CHECKING:
    from core.methods.base import Method


class UnknownMethod(KeyError):
    pass


@functools.cache
def get_method(name: str) -> Method:
    entry = CATALOGUE.get(name)
    if entry is None:
        raise UnknownMethod(f"unknown method {name!r}; known: {', '.join(sorted(CATALOGUE))}")
    module_name, class_name = entry.implementation.split(":")
    return getattr(importlib.import_module(module_name), class_name)()
