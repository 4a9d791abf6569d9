"""HTTP from Conveyor's own processes: an opener that never follows redirects.

Both of Conveyor's HTTP clients send a credential (the CLI an API key, the relay and the API RabbitMQ's
password to the management API), and urllib's default opener follows a redirect with the same
``Authorization`` header to wherever it points. With this one a 3xx is an ``HTTPError`` instead.
"""

from __future__ import annotations

import urllib.request
from typing import Any


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


def opener() -> urllib.request.OpenerDirector:
    """An opener like ``urllib.request.urlopen``'s, refusing redirects."""
    return urllib.request.build_opener(_NoRedirects)
