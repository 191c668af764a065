"""Dependencies as types: routes read as declarations, tests swap implementations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.config import Settings, get_settings
from core.db import new_session
from core.errors import ApiError
from core.storage.base import Storage
from core.storage.factory import make_storage
from core.tenants.keys import KeyState, check_key
from core.tenants.limits import tenant_limits
from core.tenants.rate_limit import WINDOW_S, limiter_for

log = logging.getLogger(__name__)


def settings_dep() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = new_session(settings.database_url)
    try:
        yield session
    finally:
        try:
            session.close()
        except OperationalError:
            # The connection died after the request's work (the database restarted or the network
            # cut): the server already rolled back, the pool drops the connection. Raising here,
            # with the response already started, would make uvicorn drop the client's connection.
            log.warning("closing a session on a dead database connection", exc_info=True)


SessionDep = Annotated[Session, Depends(get_db)]


_storages: dict[int, tuple[Settings, Storage]] = {}


def get_storage(settings: SettingsDep) -> Storage:
    # One client per Settings object: boto3 clients are costly to build and safe to share. The entry
    # keeps its Settings alive: once freed, its id could be reused by new settings (tests, after
    # reset_settings) that would then get the old object's storage.
    if id(settings) not in _storages:
        _storages[id(settings)] = (settings, make_storage(settings))
    return _storages[id(settings)][1]


StorageDep = Annotated[Storage, Depends(get_storage)]


_REFUSED = {
    None: ("invalid_api_key", "the API key is unknown"),
    KeyState.revoked: (
        "api_key_revoked",
        "the API key was revoked; create a new one with `atelier keys create`",
    ),
    KeyState.expired: (
        "api_key_expired",
        "the API key has expired; create a new one with `atelier keys create`",
    ),
}


def get_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "send an API key as 'Authorization: Bearer <key>' (create one with `atelier keys create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    check = check_key(session=session, secret=token.strip())
    if check.state is not KeyState.active:
        code, detail = _REFUSED[check.state]
        raise ApiError(401, code, detail, headers={"WWW-Authenticate": "Bearer"})
    assert check.tenant_id is not None and check.key_id is not None
    _count_request(request, session, settings, check.tenant_id, check.key_id)
    return check.tenant_id


def _count_request(
    request: Request, session: Session, settings: Settings, tenant_id: str, key_id: str
) -> None:
    """Requests per minute per key (core/tenants/rate_limit.py); the tenant's limit applies to each key."""
    limit = tenant_limits(session=session, settings=settings, tenant_id=tenant_id).requests_per_minute
    decision = limiter_for(settings.rate_limit_redis).hit(key_id, limit)
    request.state.key_id = key_id
    if not decision.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"this API key sent more than {limit} requests this minute; retry in {decision.reset_s} s",
            headers={"Retry-After": str(decision.reset_s)},
            extensions={"limit": limit, "window_s": WINDOW_S, "retry_after_s": decision.reset_s},
        )


TenantDep = Annotated[str, Depends(get_tenant)]
