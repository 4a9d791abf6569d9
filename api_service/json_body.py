"""Reading a JSON request body: one parser for every operation, and a nesting check that never recurses.

Every body is read the same way, once per request (``request_json``): as UTF-8 (RFC 8259; a leading
byte order mark is ignored), then by ``json``'s decoder on the text. Flask's own
``get_json`` hands bytes to ``json.loads``, which also takes UTF-16 and UTF-32; the checks that run
before parsing (nesting depth, unpaired surrogates) read the bytes as UTF-8 text, so a body in another
encoding would have slipped past them. Whatever the parser refuses is a 400 ``malformed-json``,
including what it refuses with a plain ``ValueError`` (an integer of more than 4,300 digits), which
webargs let through as a 500.

An object that gives a member name twice is refused too, at any depth. RFC 8259 only says names
SHOULD be unique, and parsers differ in which value they keep (``json.loads`` the last): a proxy, a
firewall or an audit log that reads the first would see another request than the one Conveyor runs,
and two bodies differing only in a shadowed value would share an idempotency fingerprint.
"""

from __future__ import annotations

import json
import re
from typing import Any

import flask_smorest
from flask import Request, g, request
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from api_service.problems import Problem, pointer
from shared.jobs import has_unpaired_surrogate, text_path
from shared.json_names import DuplicateName, unique_members

#: A JSON string (escapes included; an unterminated one runs to the end of the body, a lone backslash
#: included) or a bracket, for the exact count of a body whose brackets do not pair up. Each match
#: starts where the last one ended, so one pass over the body is linear. A pattern that needs the
#: closing quote restarts at every quote of an unterminated string: quadratic, and a 256 KiB body of
#: escaped quotes held an API process (and its GIL) for minutes.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
#: Every byte but the four brackets (deleted), and the brackets as one kind of pair.
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_ONE_KIND = bytes.maketrans(b"[{]}", b"(())")
#: Each level removed in C is a pass over the body: past this many (CONVEYOR_MAX_JSON_DEPTH set above
#: 64), the one linear pass of the count by tokens is cheaper.
_MOST_LEVELS_IN_C = 64


def depth(body: bytes, limit: int) -> int:
    """Deepest array/object nesting in a JSON text, without parsing it (so without recursion); at most
    ``limit + 1``, however deep it goes.

    Every step is a pass of C code over the body, where a Python loop over every string and bracket
    cost five times ``json.loads`` (0.8 ms for a batch of 100 jobs; 0.1 ms now). In JSON a backslash
    occurs only in a string, as an escape: without the escaped backslashes and then the escaped
    quotes, every quote left opens or closes a string, and what lies between every other pair of
    quotes is outside the strings. Its brackets are then removed an innermost level at a time (as
    ``()``, whatever their kind). Brackets that do not pair up (not JSON: its parser refuses it later),
    and bodies nested deeper than ``_MOST_LEVELS_IN_C``, are counted one by one instead, linearly.
    """
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[::2]).translate(_ONE_KIND, _NOT_BRACKETS)
    level = 0
    while brackets and level <= limit:
        inner = brackets.replace(b"()", b"")
        if len(inner) == len(brackets) or level == _MOST_LEVELS_IN_C:
            return min(_depth_by_tokens(body), limit + 1)
        brackets, level = inner, level + 1
    return level


def _depth_by_tokens(body: bytes) -> int:
    level = deepest = 0
    for token in _TOKEN.findall(body):
        if token in (b"[", b"{"):
            level += 1
            deepest = max(deepest, level)
        elif token in (b"]", b"}"):
            level -= 1
    return deepest


def unpaired_surrogate_path() -> tuple[str, ...] | None:
    """Where in this request's JSON body a string (or an object key) holds an unpaired surrogate; None
    if nowhere, or if the body is not JSON (the operation's parser says so, if it reads the body).

    Read by ``request_json``, so the operation gets the value parsed here; and by ``parse``, which
    ignores a leading byte order mark (``json.loads`` refused such a body, so its surrogate went
    unchecked and reached Postgres: a 500)."""
    try:
        value = request_json()
    except Problem:
        return None
    return text_path(value, has_unpaired_surrogate)


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
        return _decode(text)
    except json.JSONDecodeError as exc:
        raise Problem("malformed-json", f"The request body is not valid JSON: {exc}.") from None
    except ValueError as exc:  # an integer too long to convert (sys.get_int_max_str_digits)
        raise Problem(
            "malformed-json", f"The request body holds a number that cannot be read: {exc}"
        ) from None
    except RecursionError:  # the depth check runs first; this is its backstop
        raise Problem("malformed-json", "The request body nests too deeply to parse.") from None


def _decode(text: str) -> Any:
    """The JSON value of ``text``; a ``malformed-json`` problem if an object in it gives a member name
    twice, and the decoder's own errors for text that is not JSON."""
    try:
        return _DECODER.decode(text)
    except DuplicateName:
        pass  # read it again to say where: the hook that refused it knows the name, not the place
    path = _duplicate_path(_MARKING_DECODER.decode(text))  # raises if the text is not JSON after it
    raise Problem(
        "malformed-json",
        f"The request body gives the member {json.dumps(path[-1], ensure_ascii=False)} more than once in "
        f"one object, at {pointer(path)}; give each name once (JSON parsers differ in which of the values "
        "they keep).",
    )


class _Duplicated(dict[str, Any]):
    """An object that gave ``name`` more than once (the first such name), as the marking decoder
    builds it."""

    def __init__(self, pairs: list[tuple[str, Any]], name: str) -> None:
        super().__init__(pairs)
        self.name = name


def _mark_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    try:
        return unique_members(pairs)
    except DuplicateName as duplicate:
        return _Duplicated(pairs, duplicate.name)


#: Where a value sits: its container's place and its key or index (None for the whole body).
_Place = tuple["_Place", str | int] | None


def _duplicate_path(value: Any) -> tuple[str, ...]:
    """The keys and indexes to the first duplicated member of a value the marking decoder built: the
    outermost first, then in document order (an object inside a shadowed value is not reachable, but
    the object that shadowed it is). A path is spelt out only for the one found."""
    stack: list[tuple[Any, _Place]] = [(value, None)]
    while stack:
        item, place = stack.pop()
        if isinstance(item, _Duplicated):
            path: list[str] = [item.name]
            while place is not None:
                place, key = place
                path.append(str(key))
            return tuple(reversed(path))
        if isinstance(item, dict):
            stack.extend((child, (place, key)) for key, child in reversed(item.items())
                         if isinstance(child, dict | list))  # fmt: skip
        elif isinstance(item, list):
            stack.extend((item[index], (place, index)) for index in range(len(item) - 1, -1, -1)
                         if isinstance(item[index], dict | list))  # fmt: skip
    raise AssertionError("the decoder refused a duplicate name that the marking decoder did not find")


#: json.loads' own decoder (the same scanner, strict about control characters), refusing an object
#: that gives a member name twice. The hook sees objects only: strings, numbers (big integers, floats,
#: NaN), nesting and the order of keys are read as before. (json.loads itself also refused a text
#: starting with a byte order mark; ``parse`` removes one, and a second is refused like any stray
#: character.) Its cost, measured with timeit: the decoder builds each object from a list of pairs,
#: 1.3 us more than json.loads on a single submission (5.3 against 4.0 us), 1.7 to 2 times its time
#: on a batch (0.39 against 0.21 ms for 100 jobs, 3.9 against 2.2 ms for 1,000). Built once: json.loads
#: with a hook builds a decoder on every call (4.3 us more on a single submission). A cheap test for
#: "no duplicate possible" that spares most bodies the hook (the body's colons against those of the
#: value written back out) cost more than the hook itself.
_DECODER = json.JSONDecoder(object_pairs_hook=unique_members)
#: Only for a body the decoder refused: builds the value again, marking where the duplicate is.
_MARKING_DECODER = json.JSONDecoder(object_pairs_hook=_mark_duplicates)


class Parser(FlaskParser):
    """webargs' Flask parser, reading JSON bodies with ``parse``."""

    def _raw_load_json(self, req: Request) -> Any:
        if not is_json_request(req):
            return core.missing
        return request_json()


class Blueprint(flask_smorest.Blueprint):  # type: ignore[misc]
    """flask-smorest's Blueprint, whose ``@arguments`` read JSON bodies with ``parse``."""

    ARGUMENTS_PARSER = Parser()
