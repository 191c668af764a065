"""Dependencies as types: routes read as declarations, tests swap implementations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.config import Settings, get_settings
from core.db import new_session
from core.errors import ApiError
from core.storage import Storage, make_storage
from core.tenants import KeyState, check_key


def settings_dep() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = new_session(settings.database_url)
    try:
        yield session
    finally:
        session.close()


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


def get_tenant(request: Request, session: SessionDep) -> str:
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
    assert check.tenant_id is not None
    return check.tenant_id


TenantDep = Annotated[str, Depends(get_tenant)]
