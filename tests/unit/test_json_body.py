"""Reading JSON bodies: the nesting scan and the one parser every operation uses."""

from __future__ import annotations

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
    assert depth(body) == expected


def test_depth_is_linear_on_an_unterminated_string_of_escaped_quotes() -> None:
    """A pattern that needed the closing quote restarted at every quote of such a string: 256 KiB held
    an API process (and its GIL) for minutes. Here it must finish at once; 60 s only bounds a hang."""
    script = (
        "from api_service.json_body import depth\n"
        "for tail in (b'', b'\\\\'):\n"
        "    assert depth(b'[\"' + b'\\\\\"' * 131_000 + tail) == 1\n"
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
