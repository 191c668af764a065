"""Which export formats each method offers (torch-free: the API validates `?format=` with it), as
core/spec/catalogue.py states them.

Exports are written by the worker when the artifact is made, under `exports/<format>/` beside the
primary (diffusers) files, hashed in the manifest like every other file, and listed in the
manifest's `exports: {format: [file names]}`. Aliases name the tool a user has in mind.
"""

from __future__ import annotations

from core.spec.catalogue import CATALOGUE

PRIMARY = "diffusers"

# method -> format -> what a user gets (core.spec.catalogue states each method's formats)
FORMATS: dict[str, dict[str, str]] = {
    name: {offered.name: offered.description for offered in entry.exports}
    for name, entry in CATALOGUE.items()
}
# method -> the name a user may ask for -> the format it means
ALIASES: dict[str, dict[str, str]] = {
    name: {
        **dict.fromkeys(entry.primary_aliases, PRIMARY),
        **{alias: offered.name for offered in entry.exports for alias in offered.aliases},
    }
    for name, entry in CATALOGUE.items()
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
