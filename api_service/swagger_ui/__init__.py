"""Swagger UI at ``/docs``, served whole by this API: the page, its script and its styles.

Nothing on the page comes from another host. The page takes API keys (its Authorize button), so a script
from a CDN could read them, and a browser without internet access would get a blank page. The script and
styles are swagger-ui-dist's, kept byte for byte in ``vendor/`` (its README.md names the release, where it
came from and each file's sha256); ``docs.js`` is Conveyor's own and starts Swagger UI on the page. With
no inline script, the page's Content-Security-Policy allows scripts from this origin only.

``register`` adds the routes only when ``CONVEYOR_API_DOCS`` is on: with the docs off, ``/docs`` and
``/docs/assets/...`` do not exist (404).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from flask import Blueprint, Flask, Response, abort, current_app, send_file, url_for
from markupsafe import escape

PATH = "/docs"
_HERE = Path(__file__).parent

#: The page's policy: scripts and styles from this origin only (nothing inline, nothing evaluated);
#: images only as data: URIs (Swagger UI's icons, in its CSS); connections to this API only (the
#: document, "Try it out"). No <base>, no form posts (the Authorize dialog posts none), no framing.
#: Swagger UI's styles set at run time go through the DOM, which style-src does not restrict.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: What ``/docs/assets/<name>`` serves: the file and its Content-Type. Nothing else in the folder is
#: served (404), not even the licence files.
ASSETS = {
    "swagger-ui.css": (_HERE / "vendor" / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (_HERE / "vendor" / "swagger-ui-bundle.js", "text/javascript"),
    "docs.js": (_HERE / "docs.js", "text/javascript"),
}

#: The spec URL is a data attribute that docs.js reads, so the page itself holds no script.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="{css}">
</head>
<body>
<div id="swagger-ui" data-spec-url="{spec}"></div>
<script src="{bundle}"></script>
<script src="{start}"></script>
</body>
</html>
"""

blp = Blueprint("swagger_ui", __name__)


def register(app: Flask, *, enabled: bool) -> None:
    """Serve the page and its assets if ``enabled`` (``CONVEYOR_API_DOCS``); otherwise add no route."""
    if enabled:
        app.register_blueprint(blp)


@blp.get(PATH)
def page() -> Response:
    """Swagger UI for the OpenAPI document (``no-store``, like every response but the assets)."""
    html = _PAGE.format(
        title=escape(current_app.config["API_TITLE"]),
        css=escape(url_for(".asset", name="swagger-ui.css")),
        # flask-smorest's endpoint for OPENAPI_JSON_PATH: a prefix or a mount point is taken into account.
        spec=escape(url_for("api-docs.openapi_json")),
        bundle=escape(url_for(".asset", name="swagger-ui-bundle.js")),
        start=escape(url_for(".asset", name="docs.js")),
    )
    response = Response(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    return response


@blp.get(f"{PATH}/assets/<name>")
def asset(name: str) -> Response:
    """One of ``ASSETS``, with its sha256 as a strong ETag; 404 for any other name."""
    if name not in ASSETS:
        abort(404)
    path, mimetype = ASSETS[name]
    response = send_file(path, mimetype=mimetype, etag=_sha256(path), conditional=True)
    # The browser keeps the file and asks again on each load of /docs, getting a 304 without a body
    # until an upgrade changes it. A long max-age would need a version in every URL; this needs none.
    response.headers["Cache-Control"] = "no-cache"
    return response


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
