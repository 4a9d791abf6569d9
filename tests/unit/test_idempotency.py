"""The Idempotency-Key header: parsing and request fingerprints (api_service/idempotency.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from api_service.idempotency import MAX_KEY_LENGTH, fingerprint, parse_key
from shared.errors import IdempotencyKeyInvalid

# --- parse_key --------------------------------------------------------------------------------------


def test_absent_header_means_no_key() -> None:
    assert parse_key([]) is None


def test_plain_key_is_returned_as_sent() -> None:
    assert parse_key(["order-42"]) == "order-42"


def test_uuid_is_a_valid_key() -> None:
    key = str(uuid.uuid4())
    assert parse_key([key]) == key


def test_structured_field_string_is_unquoted() -> None:
    assert parse_key(['"abc"']) == "abc"


def test_surrounding_whitespace_is_not_part_of_the_key() -> None:
    assert parse_key(["  abc \t"]) == "abc"


def test_every_visible_ascii_character_but_the_excluded_four_is_allowed() -> None:
    allowed = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",\\')
    assert parse_key([allowed]) == allowed


def test_header_sent_twice_is_rejected() -> None:
    with pytest.raises(IdempotencyKeyInvalid, match="only once"):
        parse_key(["abc", "abc"])


@pytest.mark.parametrize("value", ["", "   ", '""'])
def test_empty_key_is_rejected(value: str) -> None:
    with pytest.raises(IdempotencyKeyInvalid, match="empty"):
        parse_key([value])


def test_key_of_max_length_is_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert MAX_KEY_LENGTH == 255
    assert parse_key([key]) == key


def test_key_one_past_max_length_is_rejected() -> None:
    with pytest.raises(IdempotencyKeyInvalid, match="256 characters"):
        parse_key(["k" * 256])


def test_quotes_do_not_count_towards_the_length() -> None:
    assert parse_key(['"' + "k" * 255 + '"']) == "k" * 255
    with pytest.raises(IdempotencyKeyInvalid):
        parse_key(['"' + "k" * 256 + '"'])


@pytest.mark.parametrize(
    "value",
    [
        "two words",  # space
        "a,b",  # a comma would make two header values look like one
        "back\\slash",
        'dou"ble',
        '"unbalanced',
        "clé",  # non-ASCII
        "tab\tinside",
        "emoji-🔑",
    ],
)
def test_key_with_a_forbidden_character_is_rejected(value: str) -> None:
    with pytest.raises(IdempotencyKeyInvalid, match="visible ASCII"):
        parse_key([value])


# --- fingerprint ------------------------------------------------------------------------------------

BODY = {"type": "demo.sleep", "payload": {"seconds": 2, "fatal": False}, "labels": {"team": "billing"}}


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    digest = fingerprint("POST", "/v1/jobs", BODY)
    assert len(digest) == 64
    int(digest, 16)


def test_fingerprint_ignores_key_order() -> None:
    assert fingerprint("POST", "/v1/jobs", {"a": 1, "b": 2}) == fingerprint(
        "POST", "/v1/jobs", {"b": 2, "a": 1}
    )


def test_fingerprint_ignores_key_order_in_nested_objects() -> None:
    reordered = {
        "labels": {"team": "billing"},
        "payload": {"fatal": False, "seconds": 2},
        "type": "demo.sleep",
    }
    assert fingerprint("POST", "/v1/jobs", BODY) == fingerprint("POST", "/v1/jobs", reordered)


def test_fingerprint_ignores_whitespace_of_the_json_sent() -> None:
    compact = json.loads('{"a":1,"b":[1,2]}')
    spaced = json.loads('{ "b" : [ 1 , 2 ] ,\n  "a" : 1 }')
    assert fingerprint("POST", "/v1/jobs", compact) == fingerprint("POST", "/v1/jobs", spaced)


def test_integral_float_and_integer_have_the_same_fingerprint() -> None:
    assert fingerprint("POST", "/v1/jobs", {"a": 1, "b": 2.0}) == fingerprint(
        "POST", "/v1/jobs", {"b": 2, "a": 1}
    )
    assert fingerprint("POST", "/v1/jobs", {"xs": [1.0, {"y": 3.0}]}) == fingerprint(
        "POST", "/v1/jobs", {"xs": [1, {"y": 3}]}
    )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"a": 1}, {"a": 2}),
        ({"a": 2}, {"a": 2.5}),
        ({"a": 1}, {"a": True}),
        ({"a": "1"}, {"a": 1}),
        ({"a": 1}, {"a": 1, "b": None}),
        ({"a": [1, 2]}, {"a": [2, 1]}),
    ],
)
def test_different_bodies_have_different_fingerprints(one: object, other: object) -> None:
    assert fingerprint("POST", "/v1/jobs", one) != fingerprint("POST", "/v1/jobs", other)


def test_method_is_part_of_the_fingerprint() -> None:
    assert fingerprint("POST", "/v1/jobs", BODY) != fingerprint("PUT", "/v1/jobs", BODY)


def test_method_case_does_not_matter() -> None:
    assert fingerprint("post", "/v1/jobs", BODY) == fingerprint("POST", "/v1/jobs", BODY)


def test_path_is_part_of_the_fingerprint() -> None:
    assert fingerprint("POST", "/v1/jobs", BODY) != fingerprint("POST", "/v2/jobs", BODY)
