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
import textwrap

from support import ROOT

#: Fewer objects than a started API or worker process holds after imports alone (about 65,000 and
#: 32,000): a freeze of only a few, or none, fails.
SOME_STARTUP_OBJECTS = 10_000


def run_python(code: str, env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_an_api_worker_freezes_its_app_once_loaded(service_env: dict[str, str]) -> None:
    found = run_python(
        """
        import gc, json
        from api_service.wsgi import app  # what a gunicorn worker loads first
        from api_service import gunicorn_conf

        def visited():
            return any(o is app.url_map for o in gc.get_objects())

        before = (gc.get_freeze_count(), visited())
        gunicorn_conf.post_worker_init(None)  # gunicorn calls it once the worker has loaded the app
        print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "visited": visited()}))
        """,
        service_env,
    )
    assert found["before"] == [0, True]
    assert found["visited"] is False, "the app's objects are still visited by every full collection"
    frozen = found["frozen"]
    assert isinstance(frozen, int)
    assert frozen > SOME_STARTUP_OBJECTS


def test_a_worker_process_freezes_its_runtime_once_booted(service_env: dict[str, str]) -> None:
    found = run_python(
        """
        import gc, json
        import dramatiq
        from worker_service import app  # what dramatiq imports in each worker process

        broker = dramatiq.get_broker()

        def visited():
            return any(o is app.runtime.executor for o in gc.get_objects())

        before = (gc.get_freeze_count(), visited())
        app.runtime.after_process_boot(broker)
        try:
            print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "visited": visited()}))
        finally:
            app.runtime.after_worker_shutdown(broker, None)
        """,
        service_env,
    )
    assert found["before"] == [0, True]
    assert found["visited"] is False, "the worker's runtime is still visited by every full collection"
    frozen = found["frozen"]
    assert isinstance(frozen, int)
    assert frozen > SOME_STARTUP_OBJECTS
