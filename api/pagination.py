"""Cursor pagination shared by list endpoints: newest first, `?after=<id>&limit=`, `{data, has_more}`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session


def page(
    session: Session, query: Select[Any], id_column: Any, *, after: str | None, limit: int
) -> tuple[list[Any], bool]:
    if after:
        query = query.where(id_column < after)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
