"""Reading JSON bodies: the nesting scan and the one parser every operation uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from api_service.json_body import depth, parse
from api_service.problems import Problem


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", 1),
        (b'["a\\"[",[[1]]]', 3),  # an escaped quote does not end a string; brackets in strings do not count
        (b'{"a": "[[[[", "b": [{"c": []}]}', 4),
        (b'["\\\\", [1]]', 2),  # an escaped backslash ends before the closing quote
        (b'[["unterminated \\"[[[[', 2),  # an unterminated string runs to the end
        (b'[["trailing backslash \\', 2),
        (b"", 0),
    ],
)
def test_depth_counts_only_brackets_outside_strings(body: bytes, expected: int) -> None:
    assert depth(body, 100) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[}", 1),  # brackets that do not pair up (not JSON) are counted one by one
        (b'[[{"a": 1}]', 3),
        (b"[[]]]]", 2),
        (b"[{]}", 2),
    ],
)
def test_depth_of_brackets_that_do_not_pair_up(body: bytes, expected: int) -> None:
    assert depth(body, 100) == expected


def test_depth_stops_one_past_the_limit() -> None:
    assert depth(b"[" * 5 + b"]" * 5, 5) == 5
    assert depth(b"[" * 6 + b"]" * 6, 5) == 6
    assert depth(b"[" * 100_000 + b"]" * 100_000, 32) == 33
    # Past 64 levels (a limit set that high), one linear pass instead of a pass per level.
    assert depth(b"[" * 100 + b"]" * 100, 1000) == 100
    assert depth(b"[" * 100_000 + b"]" * 100_000, 100_000) == 100_000


def test_depth_agrees_with_the_parsed_value() -> None:
    def nesting(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max(map(nesting, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(nesting, value), default=0)
        return 0

    values: list[object] = [
        {"jobs": [{"type": "noop", "payload": {"a": [1, {"b": "]]}"}]}, "labels": {}} for _ in range(3)]},
        [[], [[]], {"x": [[[{}]]]}, "[{"],
        {"a": {"b": {"c": {"d": []}}}, "e": [{"f": [[]]}]},
        # backslashes and quotes in strings, escaped in the JSON text: \\, \" and both in a row
        ["\\", '\\"[', {'\\\\"{': ["]\\", ['"', ["\\\\"]]]}, '"]]', "\u2028["],
    ]
    for value in values:
        body = json.dumps(value).encode()
        assert depth(body, 100) == nesting(value), body


def test_depth_is_linear_on_an_unterminated_string_of_escaped_quotes() -> None:
    """A pattern that needed the closing quote restarted at every quote of such a string: 256 KiB held
    an API process (and its GIL) for minutes. Here it must finish at once; 60 s only bounds a hang."""
    script = (
        "from api_service.json_body import depth\n"
        "for tail in (b'', b'\\\\'):\n"
        "    assert depth(b'[\"' + b'\\\\\"' * 131_000 + tail, 32) == 1\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ('{"jobs": []}'.encode("utf-16"), "not UTF-8"),  # json.loads(bytes) would take UTF-16 (its BOM)
        ('{"jobs": []}'.encode("utf-16-le"), "not valid JSON"),  # decoded as UTF-8: NULs between
        ('{"jobs": []}'.encode("utf-32-le"), "not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": ' + b"9" * 5000 + b"}", "number that cannot be read"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        (b"", "not valid JSON"),
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "not-utf-8", "huge-integer", "recursion", "empty"],
)
def test_parse_refuses_with_malformed_json(body: bytes, detail: str) -> None:
    with pytest.raises(Problem) as refused:
        parse(body)
    assert refused.value.type.slug == "malformed-json"
    assert detail in refused.value.detail


def test_parse_reads_utf8() -> None:
    assert parse('{"ü": [1, 2.5, "\\ud83d\\ude00"]}'.encode()) == {"ü": [1, 2.5, "😀"]}


def test_parse_ignores_a_byte_order_mark() -> None:
    """RFC 8259 lets a parser ignore one; refused, the client got Python's 'decode using utf-8-sig'."""
    assert parse('\ufeff{"a": 1}'.encode()) == {"a": 1}


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b'{"type": "noop", "type": "demo.sleep"}', "/type"),
        (b'{"type": "noop", "labels": {"team": "a", "env": "b", "team": "c"}}', "/labels/team"),
        (b'{"jobs": [{}, {}, {}, {"payload": {"to": "a@x", "to": "b@y"}}]}', "/jobs/3/payload/to"),
        (b'{"jobs": [{"type": "noop", "idempotency_key": "a", "idempotency_key": "b"}]}',
         "/jobs/0/idempotency_key"),
        (b'{"jobs": [], "jobs": [{"type": "noop"}]}', "/jobs"),
        (b'[[1], {"a": {"b": [{"c": 1, "c": 1}]}}]', "/1/a/b/0/c"),  # the same value twice, too
        (b'{"to": 1, "t\\u006f": 2}', "/to"),  # one name, however it is escaped
        (b'{"a/b~": 1, "a/b~": 2}', "/a~1b~0"),
        (b'{"": 1, "": 2}', "/"),
        (b'{"a": {"x": 1, "x": 2}, "b": {"y": 1, "y": 2}}', "/a/x"),  # the first in document order
        (b'{"a": {"x": 1, "x": 2}, "a": 3}', "/a"),  # the outer one: the inner object was shadowed
        ('\ufeff{"ü": 1, "ü": 2}'.encode(), "/ü"),
    ],
)  # fmt: skip
def test_parse_refuses_a_member_name_given_twice_and_says_where(body: bytes, pointer: str) -> None:
    """RFC 8259: parsers differ in which value they keep (json.loads kept the last), so a proxy or an
    audit log could read another request than the one Conveyor ran."""
    with pytest.raises(Problem) as refused:
        parse(body)
    assert refused.value.type.slug == "malformed-json"
    assert f"more than once in one object, at {pointer};" in refused.value.detail


def test_parse_names_the_duplicated_member_as_json() -> None:
    with pytest.raises(Problem) as refused:
        parse(b'{"say \\"hi\\"": 1, "say \\"hi\\"": 2}')
    assert 'gives the member "say \\"hi\\"" more than once' in refused.value.detail


def test_a_duplicate_before_invalid_json_is_reported_as_invalid_json() -> None:
    """The parser stops at the first duplicate; the second reading, which finds where it is, meets
    the error after it."""
    with pytest.raises(Problem) as refused:
        parse(b'{"a": 1, "a": 2} trailing')
    assert refused.value.type.slug == "malformed-json"
    assert "not valid JSON: Extra data" in refused.value.detail


def test_the_same_name_in_different_objects_is_fine() -> None:
    body = b'{"jobs": [{"type": "noop", "labels": {"type": "x"}}, {"type": "noop"}], "type": {"type": 1}}'
    assert parse(body) == json.loads(body)


def test_parse_reads_what_json_loads_reads() -> None:
    """The duplicate check sees objects only: key order, numbers (big integers, floats, exponents,
    NaN and Infinity, which json.loads also takes), strings and nesting are read as before."""
    body = (
        '{"z": 1, "a": [1.0, -0.0, 1e400, -1e-400, 12345678901234567890123456789, NaN, -Infinity],'
        ' "m": {"s": "\\ud83d\\ude00\\u0000\\\\", "e": {}, "l": [], "n": null, "t": true},'
        ' "ü": [[{"b": 2, "a": 1}]]}'
    )
    parsed = parse(body.encode())
    expected = json.loads(body)
    assert repr(parsed) == repr(expected)  # NaN != NaN, and 1 == 1.0: compare what was built
    assert list(parsed) == ["z", "a", "m", "ü"]
    assert list(parsed["ü"][0][0]) == ["b", "a"]
    assert type(parsed) is dict
    assert type(parsed["m"]["e"]) is dict
