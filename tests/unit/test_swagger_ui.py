"""The vendored Swagger UI files (api_service/swagger_ui/vendor): exactly those its README.md records."""

from __future__ import annotations

import hashlib
import re

from support import ROOT

VENDOR = ROOT / "api_service" / "swagger_ui" / "vendor"


def test_vendored_files_are_byte_for_byte_the_recorded_release() -> None:
    readme = (VENDOR / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", readme, re.MULTILINE))
    on_disk = {path.name for path in VENDOR.iterdir()} - {"README.md"}
    assert set(recorded) == on_disk, "vendor/ holds a file its README.md does not record, or lacks one"
    for name, digest in recorded.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} was changed"
