"""Reading a JSON request body: one parser for every operation, and a nesting check that never recurses.

Every body is read the same way, once per request (``request_json``): as UTF-8 (RFC 8259; a leading
byte order mark is ignored), then ``json.loads`` on the text. Flask's own
``get_json`` hands bytes to ``json.loads``, which also takes UTF-16 and UTF-32; the checks that run
before parsing (nesting depth, unpaired surrogates) read the bytes as UTF-8 text, so a body in another
encoding would have slipped past them. Whatever the parser refuses is a 400 ``malformed-json``,
including what it refuses with a plain ``ValueError`` (an integer of more than 4,300 digits), which
webargs let through as a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any

import flask_smorest
from flask import Request, g, request
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from api_service.problems import Problem

#: A JSON string (escapes included; an unterminated one runs to the end of the body, a lone backslash
#: included) or a bracket. Each match starts where the last one ended, so one pass over the body is
#: linear. A pattern that needs the closing quote restarts at every quote of an unterminated string:
#: quadratic, and a 256 KiB body of escaped quotes held an API process (and its GIL) for minutes.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


def depth(body: bytes) -> int:
    """Deepest array/object nesting in a JSON text, without parsing it (so without recursion)."""
    level = deepest = 0
    for token in _TOKEN.findall(body):
        if token in (b"[", b"{"):
            level += 1
            deepest = max(deepest, level)
        elif token in (b"]", b"}"):
            level -= 1
    return deepest


def request_json() -> Any:
    """The JSON value of this request's body, parsed once (the arguments parser, the batch view and the
    idempotency fingerprint all read it)."""
    if "json_body" not in g:
        g.json_body = parse(request.get_data(cache=True))
    return g.json_body


def parse(body: bytes) -> Any:
    """The JSON value of a request body, or a 400 ``malformed-json`` problem that says why not."""
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")  # RFC 8259 lets a parser ignore a BOM
    except UnicodeDecodeError:
        raise Problem("malformed-json", "The request body is not UTF-8 text; send JSON in UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Problem("malformed-json", f"The request body is not valid JSON: {exc}.") from None
    except ValueError as exc:  # an integer too long to convert (sys.get_int_max_str_digits)
        raise Problem(
            "malformed-json", f"The request body holds a number that cannot be read: {exc}"
        ) from None
    except RecursionError:  # the depth check runs first; this is its backstop
        raise Problem("malformed-json", "The request body nests too deeply to parse.") from None


class Parser(FlaskParser):
    """webargs' Flask parser, reading JSON bodies with ``parse``."""

    def _raw_load_json(self, req: Request) -> Any:
        if not is_json_request(req):
            return core.missing
        return request_json()


class Blueprint(flask_smorest.Blueprint):  # type: ignore[misc]
    """flask-smorest's Blueprint, whose ``@arguments`` read JSON bodies with ``parse``."""

    ARGUMENTS_PARSER = Parser()
