"""A small HTTP client for Conveyor's API, used by ``conveyor jobs|dlq|queues`` (stdlib only).

    ClientError         a call that did not succeed; the command prints it as one line and exits 1
    ├── ApiUnreachable  no HTTP answer at all: connection refused, unknown host, timeout
    └── ApiProblem      the API answered with an error status (problem+json, or anything non-2xx)

The API key travels only in the ``Authorization`` header and never appears in a message. Redirects are
not followed, so the key is never sent on to another host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from shared import no_redirects

#: Where ``make run`` serves the API.
DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds to wait for an answer; generous, since a call may wait on a busy database.
TIMEOUT_SECONDS = 30.0


class ClientError(Exception):
    """A call to the API that did not succeed."""


class ApiUnreachable(ClientError):
    """No HTTP answer: the API is down, the URL is wrong, or the network is."""


@dataclass(eq=False)
class ApiProblem(ClientError):
    """An error answer: ``title``/``detail`` and ``errors`` of an RFC 9457 problem, when it is one."""

    status: int
    title: str
    detail: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.title}: {self.detail}" if self.detail else self.title

    def lines(self) -> list[str]:
        """The problem, then one line per entry of ``errors`` (``pointer`` or ``parameter``: detail)."""
        where = ("pointer", "parameter")
        return [str(self)] + [
            f"  {next((str(e[k]) for k in where if k in e), '-')}: {e.get('detail', '')}" for e in self.errors
        ]


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    headers: Message

    @property
    def retry_after(self) -> float | None:
        return _seconds(self.headers.get("Retry-After"))


def check_base_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless it is an http(s) URL with a host."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("the URL may not hold credentials; pass the API key with --key or CONVEYOR_API_KEY")
    return urllib.parse.urlunsplit(parts._replace(query="", fragment="")).rstrip("/")


class ApiClient:
    def __init__(self, base_url: str, key: str | None, timeout: float = TIMEOUT_SECONDS) -> None:
        self.base_url = check_base_url(base_url)
        self._key = key
        self._timeout = timeout
        self._opener = no_redirects.opener()  # a 3xx becomes an HTTPError, reported as an ApiProblem

    def get(self, path: str, query: Sequence[tuple[str, str]] = ()) -> Response:
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return self._call("GET", path + suffix, None, {})

    def post(
        self, path: str, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        return self._call("POST", path, data, dict(headers or {}))

    def _call(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> Response:
        headers["Accept"] = "application/json, application/problem+json"
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)  # noqa: S310 - scheme checked by check_base_url
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                return Response(answer.status, _json(answer.read()), answer.headers)
        except urllib.error.HTTPError as exc:
            raise _problem(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            reason = (
                getattr(reason, "strerror", None) or reason
            )  # "Connection refused", not "[Errno 111] ..."
            raise ApiUnreachable(f"cannot reach the Conveyor API at {self.base_url}: {reason}") from None


def _problem(exc: urllib.error.HTTPError) -> ApiProblem:
    raw = exc.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    retry_after = _seconds(exc.headers.get("Retry-After"))
    if isinstance(body, dict) and "title" in body:
        errors = body.get("errors")
        return ApiProblem(exc.code, str(body["title"]), str(body.get("detail") or ""),
                          errors if isinstance(errors, list) else [], retry_after)  # fmt: skip
    text = raw.decode("utf-8", "replace").strip().splitlines()
    return ApiProblem(
        exc.code, f"HTTP {exc.code} {exc.reason}", text[0][:200] if text else "", [], retry_after
    )


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ClientError("the API answered with something that is not JSON; is --url right?") from None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: Conveyor never sends one
