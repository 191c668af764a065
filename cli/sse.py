"""Server-sent events (the `text/event-stream` format) parsed from a stream of lines.

Just what the job events stream uses: `event:`, `data:` (several lines join with newlines), `id:`,
comments (lines starting with a colon), and a blank line that ends each event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerEvent:
    event: str  # "message" when the server names none, as browsers do
    data: str
    id: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    event, data, last_id = "", [], None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
    # A stream cut off mid-event drops that event, as the format says: it may be incomplete.
