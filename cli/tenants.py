"""`atelier tenants limits show|set|clear`: a tenant's limits, overridden per tenant on top of the
defaults in settings (ATELIER_TENANT_MAX_RUNNING_JOBS, ..._MAX_QUEUED_JOBS, ..._MAX_STORAGE_BYTES,
..._REQUESTS_PER_MINUTE). Like `atelier keys`, it works on the database directly; every API process
and worker reads the new values on its next request or claim."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from cli.output import emit, say, table
from core.config import get_settings
from core.db import session_scope, upgrade
from core.tenants.limits import (
    LIMIT_NAMES,
    TenantNotFound,
    default_limits,
    find_tenant,
    overrides_of,
    set_overrides,
    tenant_limits,
)

OPTION = {name: "--" + name.replace("_", "-") for name in LIMIT_NAMES}


def add_tenants_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tenants = sub.add_parser(
        "tenants", help="tenant limits (on the database: run where the server's settings are)"
    )
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    limits = tenants_sub.add_parser("limits", help="show or override a tenant's limits")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True)
    show = limits_sub.add_parser("show", help="the tenant's limits, and which are its own")
    show.add_argument("tenant", metavar="TENANT", help="a tenant's name or id")
    setter = limits_sub.add_parser("set", help="override some limits (the others stay)")
    setter.add_argument("tenant", metavar="TENANT", help="a tenant's name or id")
    for name, option in OPTION.items():
        setter.add_argument(option, dest=name, type=int, metavar="N")
    clear = limits_sub.add_parser("clear", help="back to the defaults (all, or the limits named)")
    clear.add_argument("tenant", metavar="TENANT", help="a tenant's name or id")
    clear.add_argument("names", nargs="*", metavar="LIMIT", help=f"any of {', '.join(LIMIT_NAMES)}")
    tenants.set_defaults(func=run_tenants_command)


def run_tenants_command(args: argparse.Namespace) -> int:
    command = {"show": _show, "set": _set, "clear": _clear}[args.limits_command]
    with _session() as session:
        try:
            tenant = find_tenant(session=session, tenant=args.tenant)
        except TenantNotFound as exc:
            say(f"error: {exc}")
            return 1
        return command(args, session, tenant.id)


def _set(args: argparse.Namespace, session: Session, tenant_id: str) -> int:
    values = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    if not values:
        say(f"error: name at least one limit: {', '.join(OPTION.values())}")
        return 2
    try:
        set_overrides(session=session, tenant_id=tenant_id, values=values)
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    return _show(args, session, tenant_id)


def _clear(args: argparse.Namespace, session: Session, tenant_id: str) -> int:
    names = args.names or list(LIMIT_NAMES)
    try:
        set_overrides(session=session, tenant_id=tenant_id, values=dict.fromkeys(names))
    except ValueError as exc:
        say(f"error: {exc} (limits: {', '.join(LIMIT_NAMES)})")
        return 2
    return _show(args, session, tenant_id)


def _show(args: argparse.Namespace, session: Session, tenant_id: str) -> int:
    settings = get_settings()
    limits = tenant_limits(session=session, settings=settings, tenant_id=tenant_id).as_dict()
    defaults = default_limits(settings).as_dict()
    own = overrides_of(session=session, tenant_id=tenant_id)
    rows = [
        (name, limits[name], "tenant" if name in own else "default", defaults[name]) for name in LIMIT_NAMES
    ]
    emit(table(("LIMIT", "VALUE", "FROM", "DEFAULT"), rows))
    return 0


def _session() -> AbstractContextManager[Session]:
    settings = get_settings()
    upgrade(settings.database_url)
    return session_scope(settings.database_url)
