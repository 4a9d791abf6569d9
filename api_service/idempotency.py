"""The ``Idempotency-Key`` header (draft-ietf-httpapi-idempotency-key-header): parsing and fingerprints.

Semantics (enforced by ``api_service.submission``):

- first request with a key: processed normally; its response status and job are remembered for
  ``CONVEYOR_IDEMPOTENCY_TTL_SECONDS``;
- the same key with the same request (same fingerprint): the original response is replayed, with
  ``Idempotent-Replayed: true``;
- the same key with a different request: 422 ``idempotency-key-reused``;
- the same key while the first request is still being processed: 409 ``idempotency-key-in-flight``
  with ``Retry-After`` (between single submissions; a key a batch is writing is waited for, then
  replayed: ``api_service.submission.submit_batch``).

Only successful submissions are remembered: a validation error, a 503 or a 5xx leaves nothing behind,
so fixing the request and retrying with the same key works.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from shared.errors import IdempotencyKeyInvalid

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255

#: Visible ASCII except space, '"', ',' and '\\': a comma would make two headers look like one.
_KEY = re.compile(r"[!#-+\--\[\]-~]+")
#: What the document says a key is: ``_KEY``'s characters, 1 to MAX_KEY_LENGTH of them, optionally quoted.
KEY_PATTERN = rf'^(?:[!#-+\--\[\]-~]{{1,{MAX_KEY_LENGTH}}}|"[!#-+\--\[\]-~]{{1,{MAX_KEY_LENGTH}}}")$'


def parse_key(values: list[str], field: str = "The Idempotency-Key header") -> str | None:
    """The key from the header's values, None if absent; raises IdempotencyKeyInvalid. ``field`` names
    where the key came from, in the messages (a batch's jobs carry theirs in the body)."""
    if not values:
        return None
    if len(values) > 1:
        raise IdempotencyKeyInvalid(f"{field} may be sent only once.")
    raw = values[0].strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]  # structured-field string form: "key"
    if not raw:
        raise IdempotencyKeyInvalid(f"{field} is empty.")
    if len(raw) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"{field} is {len(raw)} characters long; at most {MAX_KEY_LENGTH} are allowed."
        )
    if not _KEY.fullmatch(raw):
        hint = " (sent twice, it arrives as one value joined by a comma)" if "," in raw else ""
        raise IdempotencyKeyInvalid(
            f"{field} may only hold visible ASCII characters other than space, comma, double quote and "
            f"backslash (a UUID is a good key){hint}."
        )
    return raw


def fingerprint(method: str, path: str, body: Any) -> str:
    """sha256 over the method, the path and the body as canonical JSON.

    Canonical: keys sorted, no insignificant whitespace, and integral floats written as integers, so
    ``{"a": 1, "b": 2.0}`` and ``{ "b": 2, "a": 1 }`` have the same fingerprint.
    """
    canonical = json.dumps(_normalise(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method.upper()} {path}\n{canonical}".encode()).hexdigest()


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value
