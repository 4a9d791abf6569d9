"""``conveyor keys ...`` and ``conveyor tenants ...``: managing who may use the API."""

from __future__ import annotations

import argparse
import math
import sys

from shared.api_keys import SCOPE_DESCRIPTIONS, TENANT_NAME, generate_key, parse_scopes
from shared.settings import Settings
from shared.store import Database
from shared.store import api_keys as key_store
from shared.store import tenants as tenant_store
from shared.store.db import Cursor


class UsageError(Exception):
    """A mistake in the command line; printed without a traceback, exit code 2."""


def _db(settings: Settings) -> Database:
    return Database(settings, application_name="conveyor-cli")


def _tenant_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise UsageError(
            f"invalid tenant name {name!r}: 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a "
            "letter or digit"
        )
    return name


def keys_create(settings: Settings, args: argparse.Namespace) -> int:
    tenant = _tenant_name(args.tenant)
    try:
        scopes = parse_scopes(args.scope)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    new = generate_key()
    db = _db(settings)

    def create(cur: Cursor) -> bool:
        created = tenant_store.create_tenant(cur, tenant)
        key_store.insert_key(cur, new, tenant, scopes, args.description)
        return created

    if db.run(create):
        print(f"created tenant {tenant} (default limits)", file=sys.stderr)
    print(
        f"created key {new.prefix} for tenant {tenant} with scopes {', '.join(sorted(scopes))}",
        file=sys.stderr,
    )
    print("store it now, it is not shown again:", file=sys.stderr)
    print(new.key)
    return 0


def keys_list(settings: Settings, args: argparse.Namespace) -> int:
    db = _db(settings)
    if args.tenant is not None and db.read(lambda cur: tenant_store.get_tenant(cur, args.tenant)) is None:
        print(f"conveyor keys list: no tenant {args.tenant}", file=sys.stderr)
        return 1
    keys = db.read(lambda cur: key_store.list_keys(cur, args.tenant))
    print(f"{'PREFIX':<14} {'TENANT':<20} {'SCOPES':<30} {'CREATED':<20} {'REVOKED':<20} DESCRIPTION")
    for key in keys:
        revoked = key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else "-"
        scopes = ",".join(sorted(key.scopes))
        print(f"{key.prefix:<14} {key.tenant:<20} {scopes:<30} {key.created_at:%Y-%m-%d %H:%M}     "
              f"{revoked:<20} {key.description}")  # fmt: skip
    return 0


def keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    prefix = args.prefix if args.prefix.startswith("cvk_") else f"cvk_{args.prefix}"
    prefix = prefix[:12]  # a whole key may be pasted: only its prefix is used
    if not _db(settings).execute(lambda cur: key_store.revoke(cur, prefix)):
        print(f"conveyor keys revoke: no active key has the prefix {prefix}", file=sys.stderr)
        return 1
    print(f"revoked {prefix}; it is refused from now on by every API replica")
    return 0


def tenants_create(settings: Settings, args: argparse.Namespace) -> int:
    name = _tenant_name(args.name)
    if not _db(settings).execute(lambda cur: tenant_store.create_tenant(cur, name)):
        print(f"conveyor tenants create: tenant {name} already exists", file=sys.stderr)
        return 1
    print(f"created tenant {name}")
    return 0


def tenants_list(settings: Settings, args: argparse.Namespace) -> int:
    tenants = _db(settings).read(tenant_store.list_tenants)
    print(f"{'TENANT':<24} {'MAX ACTIVE JOBS':>16} {'SUBMITS/S':>10} {'BURST':>8}")
    for t in tenants:
        print(f"{t.name:<24} {_or_default(t.max_active_jobs, settings.tenant_max_active_jobs):>16} "
              f"{_or_default(t.submit_rate_per_second, settings.tenant_submit_rate):>10} "
              f"{_or_default(t.submit_burst, settings.tenant_submit_burst):>8}")  # fmt: skip
    return 0


def _or_default(value: object, default: object) -> str:
    return f"{default}*" if value is None else str(value)


def tenants_set(settings: Settings, args: argparse.Namespace) -> int:
    name = _tenant_name(args.name)
    db = _db(settings)
    tenant = db.read(lambda cur: tenant_store.get_tenant(cur, name))
    if tenant is None:
        print(f"conveyor tenants set: no tenant {name}", file=sys.stderr)
        return 1
    changes = {
        "max_active_jobs": _limit(args.max_active_jobs, int, tenant.max_active_jobs, 0, MAX_INTEGER),
        "submit_rate_per_second": _limit(
            args.submit_rate, float, tenant.submit_rate_per_second, 0.001, MAX_SUBMIT_RATE
        ),
        "submit_burst": _limit(args.submit_burst, int, tenant.submit_burst, 1, MAX_INTEGER),
    }
    db.execute(lambda cur: tenant_store.set_limits(cur, name, **changes))  # type: ignore[arg-type]
    print(
        f"limits of {name}: " + ", ".join(f"{k}={'default' if v is None else v}" for k, v in changes.items())
    )
    return 0


#: The largest value a Postgres ``integer`` column holds.
MAX_INTEGER = 2**31 - 1
#: The largest submission rate a tenant may be given (per second): more is no limit at all.
MAX_SUBMIT_RATE = 1_000_000.0


def _limit(raw: str | None, kind: type, current: object, minimum: float, maximum: float) -> object:
    if raw is None:
        return current
    if raw == "default":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"{raw!r} is not a number (or 'default')") from None
    if not math.isfinite(value):  # float("nan"), float("inf") and float("1e400") parse
        raise UsageError(f"{raw!r} is not a finite number")
    if value < minimum:
        raise UsageError(f"{raw!r} is below the minimum of {_number(minimum)}")
    if value > maximum:
        raise UsageError(f"{raw!r} is above the maximum of {_number(maximum)}")
    return value


def _number(bound: float) -> str:
    """A bound as an operator would type it: 2147483647, 1000000, 0.001 (``:g`` wrote 2.14748e+09)."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    scope_help = "; ".join(f"{s.value}: {d}" for s, d in SCOPE_DESCRIPTIONS.items())

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create = key_commands.add_parser("create", help="create a key (printed once) for a tenant")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for (created if missing)")
    create.add_argument("--scope", action="append", required=True,
                        help=f"repeat for several: {scope_help}")  # fmt: skip
    create.add_argument("--description", default="", help="what the key is for, shown by `keys list`")
    create.set_defaults(handler=keys_create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(handler=keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key at once, on every API replica")
    revoke.add_argument("prefix", help="the key's prefix (cvk_xxxxxxxx) as shown by `keys list`")
    revoke.set_defaults(handler=keys_revoke)

    tenants = commands.add_parser("tenants", help="create and list tenants, set their limits")
    tenant_commands = tenants.add_subparsers(dest="action", required=True)
    t_create = tenant_commands.add_parser("create", help="create a tenant with default limits")
    t_create.add_argument("name")
    t_create.set_defaults(handler=tenants_create)
    t_list = tenant_commands.add_parser("list", help="list tenants and their limits (* = default)")
    t_list.set_defaults(handler=tenants_list)
    t_set = tenant_commands.add_parser("set", help="set a tenant's limits ('default' resets one)")
    t_set.add_argument("name")
    t_set.add_argument("--max-active-jobs", help="jobs waiting or running at most")
    t_set.add_argument("--submit-rate", help="sustained submissions per second")
    t_set.add_argument("--submit-burst", help="submissions allowed at once")
    t_set.set_defaults(handler=tenants_set)
