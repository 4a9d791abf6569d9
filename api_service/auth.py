"""Authentication and authorization at the HTTP edge.

Every ``/v1`` operation declares the scope it needs with ``@requires(Scope...)``; a ``before_request``
hook authenticates the caller and checks that scope *before* the request body is parsed, so an
unauthenticated caller learns nothing from validation errors. An operation that declares no scope is
refused (fail closed). HEAD needs the scope of its GET; OPTIONS (answered by Flask with the route's
methods) needs a valid key and no scope. Endpoints outside ``/v1`` (health, OpenAPI, docs, problem
types) are open; ``/metrics`` has its own rule (``authorize_metrics``).

With ``CONVEYOR_AUTH=none`` every request acts as tenant ``default`` with every scope.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, g, request

from api_service.context import services
from api_service.problems import Problem
from shared.api_keys import Principal, Scope, key_matches, key_prefix
from shared.store import api_keys as key_store
from shared.store import tenants as tenant_store
from shared.store.tenants import TenantLimits

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

REALM = 'Bearer realm="conveyor"'
_REQUIRED_SCOPE = "_conveyor_required_scope"
#: Longest Authorization header worth looking at; anything longer is not a Conveyor key.
_MAX_AUTHORIZATION = 200

#: The OpenAPI security requirement of every /v1 operation.
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key from `conveyor keys create`. A server run for local development with "
    "`CONVEYOR_AUTH=none` (as `make run` does) ignores it: every request then acts as tenant `default` "
    "with every scope, and no request gets 401 or 403. The document is the same in both modes.",
}


def requires(scope: Scope) -> Callable[[F], F]:
    """Declare the scope a view needs (checked by ``authenticate_request`` before the view runs)."""

    def mark(view: F) -> F:
        setattr(view, _REQUIRED_SCOPE, scope)
        return view

    return mark


def current_principal() -> Principal:
    principal: Principal = g.principal
    return principal


def current_limits() -> TenantLimits:
    limits: TenantLimits = g.tenant_limits
    return limits


def authenticate_request() -> None:
    """before_request hook: 401 without a valid key, 403 without the operation's scope."""
    if not request.path.startswith("/v1/") or request.endpoint is None:
        return
    required = _required_scope()
    principal, limits = _authenticate()
    if request.method == "OPTIONS":  # Flask answers it with the route's methods: any valid key may ask
        g.principal, g.tenant_limits = principal, limits
        return
    if required is None or not principal.allows(required):
        needed = required.value if required else "(none declared)"
        raise Problem(
            "forbidden",
            f"This API key does not have the {needed} scope.",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{needed}"'},
        )
    g.principal, g.tenant_limits = principal, limits


def _required_scope() -> Scope | None:
    scope: Scope | None = getattr(request_operation(), _REQUIRED_SCOPE, None)
    return scope


def request_operation() -> object:
    """The function that serves this request: the view class's method for it (HEAD runs the GET one),
    or the view function itself; None if no route matched."""
    if request.endpoint is None:
        return None
    view: object = current_app.view_functions[request.endpoint]
    view_class = getattr(view, "view_class", None)
    if view_class is None:
        return view
    return getattr(view_class, "get" if request.method == "HEAD" else request.method.lower(), None)


def _authenticate() -> tuple[Principal, TenantLimits]:
    svc = services()
    defaults = default_limits()
    if svc.settings.auth == "none":
        tenant = svc.db.read(lambda cur: tenant_store.get_tenant(cur, "default"))
        limits = tenant.limits(defaults) if tenant else defaults
        return Principal("default", frozenset(Scope), None), limits
    key = _bearer_token()
    prefix = key_prefix(key)
    found = svc.db.read(lambda cur: key_store.lookup_active(cur, prefix)) if prefix else None
    if found is None or not key_matches(key, found.secret_sha256):
        raise _unauthorized("The API key is not valid (unknown, revoked or malformed).", invalid=True)
    return Principal(found.tenant.name, found.scopes, prefix), found.tenant.limits(defaults)


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    if not header:
        raise _unauthorized("Send an API key: `Authorization: Bearer <key>`.", invalid=False)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or len(header) > _MAX_AUTHORIZATION:
        raise _unauthorized("The Authorization header must be `Bearer <key>`.", invalid=True)
    return token.strip()


def _unauthorized(detail: str, *, invalid: bool) -> Problem:
    challenge = f'{REALM}, error="invalid_token"' if invalid else REALM
    return Problem("unauthorized", detail, headers={"WWW-Authenticate": challenge})


def default_limits() -> TenantLimits:
    settings = services().settings
    return TenantLimits(
        max_active_jobs=settings.tenant_max_active_jobs,
        submit_rate_per_second=settings.tenant_submit_rate,
        submit_burst=settings.tenant_submit_burst,
    )


def authorize_metrics() -> None:
    """``/metrics``: open with CONVEYOR_AUTH=none; else the metrics token or an admin key."""
    settings = services().settings
    if settings.auth == "none":
        return
    token = settings.metrics_token
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return
    principal, _ = _authenticate()
    if not principal.is_admin:
        challenge = f'{REALM}, error="insufficient_scope", scope="admin"'
        raise Problem(
            "forbidden",
            "Metrics need the metrics token or an API key with the admin scope.",
            headers={"WWW-Authenticate": challenge},
        )


def warn_if_unauthenticated() -> None:
    if services().settings.auth == "none":
        logger.warning(
            "CONVEYOR_AUTH=none: AUTHENTICATION IS OFF. Every request acts as tenant 'default' with every "
            "scope. Use this for local development only; set CONVEYOR_AUTH=keys anywhere else."
        )


def visible_tenant(requested: str | None, what: str) -> str | None:
    """Whose records a listing shows: the caller's own; an admin sees every tenant's (None), or the one
    asked for. A non-admin asking for another tenant's gets 403."""
    principal = current_principal()
    if principal.is_admin:
        return requested
    if requested is not None and requested != principal.tenant:
        raise Problem(
            "forbidden",
            f"Only an admin key may see another tenant's {what}.",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="admin"'},
        )
    return principal.tenant
