"""Public ids: a type prefix, then a fixed-width hex millisecond timestamp and random bits.

Fixed width makes the ids sort by creation time as plain strings, which is what `?after=<id>`
cursor pagination needs on both PostgreSQL and SQLite.
"""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"
