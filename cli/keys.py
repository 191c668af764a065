"""`atelier keys create|list|revoke`: the admin surface for API keys. It works on the database
directly (the settings' ATELIER_DATABASE_URL), not through the HTTP API: whoever runs it administers
the service, not one tenant."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy.orm import Session

from cli.output import emit, say, table
from core.config import get_settings
from core.db import session_scope, upgrade
from core.tenants.keys import KeyNotFound, create_key, list_keys, parse_duration, revoke_key
from core.timeutil import iso


def keys_create(args: argparse.Namespace) -> int:
    try:
        expires_in = parse_duration(args.expires_in) if args.expires_in else None
    except ValueError as exc:
        say(f"error: --expires-in: {exc}")
        return 2
    with _session() as session:
        key = create_key(session=session, tenant_name=args.tenant, name=args.name, expires_in=expires_in)
    expiry = f", expires {iso(key.expires_at)}" if key.expires_at else ""
    say(f"tenant {key.tenant_name} ({key.tenant_id}), key {key.key_id}{expiry}")
    say("the secret is shown once; store it now:")
    emit(key.secret)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    with _session() as session:
        keys = list_keys(session=session, tenant=args.tenant)
    if args.tenant and not keys:
        say(f"no keys for tenant {args.tenant!r}")
    rows = [
        (
            k.key_id,
            k.tenant_name,
            k.name,
            k.state,
            _when(k.created_at),
            _when(k.last_used_at),
            _when(k.revoked_at or k.expires_at),
        )
        for k in keys
    ]
    emit(table(("ID", "TENANT", "NAME", "STATE", "CREATED", "LAST USED", "REVOKED/EXPIRES"), rows))
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    with _session() as session:
        try:
            revoked_at = revoke_key(session=session, key_id=args.key_id)
        except KeyNotFound as exc:
            say(f"error: {exc}")
            return 1
    say(f"key {args.key_id} revoked at {iso(revoked_at)}; its next request gets 401 api_key_revoked")
    emit(args.key_id)
    return 0


COMMANDS = {"create": keys_create, "list": keys_list, "revoke": keys_revoke}


def run_keys_command(args: argparse.Namespace) -> int:
    return COMMANDS[args.keys_command](args)


def _session() -> AbstractContextManager[Session]:
    settings = get_settings()
    upgrade(settings.database_url)
    return session_scope(settings.database_url)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M")
