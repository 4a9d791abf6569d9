"""JSON objects that give a member name twice, refused wherever Conveyor reads JSON: the API's request
bodies (``api_service/json_body.py``) and the CLI's ``--payload``.

RFC 8259 only says names SHOULD be unique, and parsers differ in which value they keep (``json.loads``
the last): a proxy, a firewall or an audit log that reads the first would see another request than the
one Conveyor runs.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateName(ValueError):
    """An object of the JSON text gives ``name`` more than once."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the member {json.dumps(name, ensure_ascii=False)} is given more than once in one object"
        )
        self.name = name


def unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook`` for ``json``: the object, or DuplicateName naming the first name given
    twice. Names are compared decoded (``"to"`` and ``"t\\u006f"`` are one name)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise DuplicateName(name)
            seen.add(name)
    return members
