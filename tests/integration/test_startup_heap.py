"""The API's and the worker's processes freeze their start-up objects out of the garbage collector's full
collections before they serve (shared/startup_heap.py).

Each check runs in a fresh interpreter, started the way gunicorn and dramatiq start one (the app, or the
broker with its actors, imported first), and then calls the hook they call: the freeze is process-wide
and would leak into this test process. It asks the collector directly whether the app's objects are
still among those that its full collections visit; it times nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from support import ROOT

#: Fewer objects than a started API or worker process holds after imports alone (about 65,000 and
#: 32,000): a freeze of only a few, or none, fails.
SOME_STARTUP_OBJECTS = 10_000


def freeze_seen(
    env: dict[str, str], *, load: str, watched: str, hook: str, after: str = "pass"
) -> dict[str, Any]:
    """In a fresh interpreter: run ``load`` (what gunicorn or dramatiq imports first), then ``hook``, then
    ``after``. Returns how many objects were frozen before and after the hook, and whether full
    collections visit the object ``watched`` names, before and after."""
    script = f"""
import gc, json
{load}

def visited():
    return any(o is {watched} for o in gc.get_objects())

before = (gc.get_freeze_count(), visited())
{hook}
try:
    print(json.dumps({{"before": before, "frozen": gc.get_freeze_count(), "visited": visited()}}))
finally:
    {after}
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def assert_frozen_by_the_hook(found: dict[str, Any], what: str) -> None:
    assert found["before"] == [0, True]
    assert found["visited"] is False, f"{what} still visited by every full collection"
    frozen = found["frozen"]
    assert isinstance(frozen, int)
    assert frozen > SOME_STARTUP_OBJECTS


def test_an_api_worker_freezes_its_app_once_loaded(service_env: dict[str, str]) -> None:
    found = freeze_seen(
        service_env,
        load="from api_service.wsgi import app\nfrom api_service import gunicorn_conf",
        watched="app.url_map",
        hook="gunicorn_conf.post_worker_init(None)",  # gunicorn calls it once the worker has loaded the app
    )
    assert_frozen_by_the_hook(found, "the app's objects are")


def test_a_worker_process_freezes_its_runtime_once_booted(service_env: dict[str, str]) -> None:
    found = freeze_seen(
        service_env,
        load="import dramatiq\nfrom worker_service import app\nbroker = dramatiq.get_broker()",
        watched="app.runtime.executor",
        hook="app.runtime.after_process_boot(broker)",
        after="app.runtime.after_worker_shutdown(broker, None)",
    )
    assert_frozen_by_the_hook(found, "the worker's runtime is")
