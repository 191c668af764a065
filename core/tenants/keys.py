"""Tenants and API keys. Keys are random, shown once, and stored only as a sha256 hash.

Every request looks its key up in the database: nothing caches a key in a process, so a revoked or
expired key is refused on its next request by every API process.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import ApiKey, Tenant
from core.timeutil import utcnow

KEY_PREFIX = "atl_"
# last_used_at is a hint for people ("is this key still in use?"), not an audit log: one write per
# key per minute instead of one per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '12h', '30d', '2w' as a timedelta; ValueError for anything else."""
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 15m or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class KeyState(StrEnum):
    active = "active"
    revoked = "revoked"
    expired = "expired"


def key_state(key: ApiKey, now: datetime) -> KeyState:
    if key.revoked_at is not None:
        return KeyState.revoked
    if key.expires_at is not None and key.expires_at <= now:
        return KeyState.expired
    return KeyState.active


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant_id: str
    tenant_name: str
    secret: str
    expires_at: datetime | None = None


def create_key(
    *,
    session: Session,
    tenant_name: str,
    name: str | None = None,
    expires_in: timedelta | None = None,
) -> NewKey:
    """Make an API key for the tenant, creating the tenant on first use."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    key = ApiKey(
        id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret), name=name, expires_at=expires_at
    )
    session.add(key)
    session.commit()
    return NewKey(
        key_id=key.id, tenant_id=tenant.id, tenant_name=tenant.name, secret=secret, expires_at=expires_at
    )


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of presenting a key: its tenant when `state` is active."""

    state: KeyState | None  # None: no such key
    key_id: str | None = None
    tenant_id: str | None = None


def check_key(*, session: Session, secret: str) -> KeyCheck:
    """Look the key up (by hash, so timing reveals nothing of it) and note its use."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None:
        return KeyCheck(state=None)
    now = utcnow()
    state = key_state(key, now)
    if state is KeyState.active:
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
            )
            .values(last_used_at=now)
        )
        session.commit()
    return KeyCheck(state=state, key_id=key.id, tenant_id=key.tenant_id)


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant_id: str
    tenant_name: str
    name: str | None
    state: KeyState
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyNotFound(LookupError):
    pass


def list_keys(*, session: Session, tenant: str | None = None) -> list[KeyInfo]:
    """Every key, or one tenant's (by name or id), oldest first. Secrets are never stored, so
    never listed."""
    query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant is not None:
        query = query.where(or_(Tenant.name == tenant, Tenant.id == tenant))
    now = utcnow()
    return [
        KeyInfo(
            key_id=key.id,
            tenant_id=row_tenant.id,
            tenant_name=row_tenant.name,
            name=key.name,
            state=key_state(key, now),
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
        )
        for key, row_tenant in session.execute(query.order_by(ApiKey.created_at, ApiKey.id))
    ]


def revoke_key(*, session: Session, key_id: str) -> datetime:
    """Revoke the key from now on; revoking it again keeps the first time. Returns that time."""
    session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    revoked_at = session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == key_id))
    if revoked_at is None:
        raise KeyNotFound(f"no API key with id {key_id!r}")
    return revoked_at
