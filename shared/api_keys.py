"""API keys and scopes. Pure: generating, parsing and hashing keys, and what each scope allows.

A key looks like ``cvk_3hx7q2mf_Zb1...`` (56 characters): ``cvk_`` marks it as a Conveyor key (so
secret scanners can find leaked ones), the next 8 characters are its public *prefix* (shown by
``conveyor keys list``, used to find the key's row), and the rest is 32 random bytes. Only the sha256 of
the whole key is stored; with 256 random bits, an unsalted fast hash is as strong as the key itself.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_MARKER = "cvk_"
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_KEY = re.compile(r"(cvk_[a-z2-7]{8})_[A-Za-z0-9_-]{43}")


class Scope(enum.StrEnum):
    JOBS_READ = "jobs:read"
    JOBS_WRITE = "jobs:write"
    ADMIN = "admin"


SCOPE_DESCRIPTIONS = {
    Scope.JOBS_READ: "read and list the tenant's own jobs",
    Scope.JOBS_WRITE: "submit (and later cancel and retry) the tenant's own jobs",
    Scope.ADMIN: "everything, across tenants: dead letters, queue stats, metrics",
}


@dataclass(frozen=True)
class NewKey:
    key: str
    prefix: str
    secret_sha256: bytes


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and what its key may do."""

    tenant: str
    scopes: frozenset[Scope]
    key_prefix: str | None

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes


def generate_key() -> NewKey:
    prefix = KEY_MARKER + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    key = f"{prefix}_{secret}"
    return NewKey(key=key, prefix=prefix, secret_sha256=hash_key(key))


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, or None (malformed keys are never looked up)."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_matches(key: str, secret_sha256: bytes) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_key(key), secret_sha256)


def parse_scopes(values: list[str]) -> frozenset[Scope]:
    """Scopes from their names; raises ValueError naming the unknown ones."""
    unknown = [v for v in values if v not in {s.value for s in Scope}]
    if unknown:
        known = ", ".join(s.value for s in Scope)
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known scopes: {known}")
    return frozenset(Scope(v) for v in values)


TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
