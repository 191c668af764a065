"""Tenants and API keys. Keys are random, shown once, and stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import ApiKey, Tenant

KEY_PREFIX = "atl_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant_id: str
    tenant_name: str
    secret: str


def create_key(*, session: Session, tenant_name: str) -> NewKey:
    """Make an API key for the tenant, creating the tenant on first use."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret))
    session.add(key)
    session.commit()
    return NewKey(key_id=key.id, tenant_id=tenant.id, tenant_name=tenant.name, secret=secret)


def tenant_for_key(*, session: Session, secret: str) -> str | None:
    """The tenant id of a live key, or None. Lookup is by hash, so timing reveals nothing of the key."""
    row = session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    )
    return row
