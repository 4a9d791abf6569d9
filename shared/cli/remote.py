"""``conveyor jobs|dlq|queues``: operating Conveyor through its HTTP API, from any host that reaches it.

Every command takes ``--url`` (env ``CONVEYOR_URL``, default http://127.0.0.1:8000), ``--key`` (env
``CONVEYOR_API_KEY``; without one no ``Authorization`` header is sent, as ``make run`` expects) and
``--json`` (print the API's JSON instead of a table). Exit codes: 0 done; 1 the API refused the call or
could not be reached, or a watched job did not succeed; 2 a usage mistake (nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any, TextIO

from shared.cli import output
from shared.cli.client import DEFAULT_URL, ApiClient, ApiProblem, ClientError, check_base_url
from shared.cli.output import Json
from shared.jobs import TERMINAL_STATUSES, JobStatus
from shared.json_names import unique_members
from shared.settings import Settings

#: Longest wait between two polls of ``jobs watch``, whatever ``Retry-After`` says: a job scheduled
#: hours ahead is still re-checked now and then, so a cancel or retry from elsewhere shows up.
MAX_POLL_SECONDS = 10.0
#: Page size of ``--all``: the API's largest, so following every page takes few requests.
PAGE_SIZE_ALL = 200
FINISHED = {status.value for status in TERMINAL_STATUSES}
#: Dead-letter filters that may be given several times (any of them matches).
REPEATABLE_FILTERS = ("type", "queue", "error_type")

Command = Callable[[ApiClient, argparse.Namespace], int]


# --- argument types: a mistake here is a usage error (exit 2), reported by argparse ------------------


def _base_url(raw: str) -> str:
    try:
        return check_base_url(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (from --url or CONVEYOR_URL)") from None


def _job_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a job id (a UUID)") from None


def _json_object(raw: str) -> Json:
    """A JSON object, given inline or as ``@path`` of a file that holds one."""
    text = raw
    if raw.startswith("@"):
        try:
            with open(raw[1:], encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {raw[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text, object_pairs_hook=unique_members)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, such as '{\"seconds\": 2}'")
    return value


def _label(raw: str) -> tuple[str, str]:
    key, equals, value = raw.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{raw!r} is not KEY=VALUE")
    return key, value


def _time(raw: str) -> str:
    """An ISO 8601 time; one without an offset is taken as local time."""
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an ISO 8601 time like 2026-12-01T09:00Z") from None
    return (parsed if parsed.tzinfo else parsed.astimezone()).isoformat()


# --- commands --------------------------------------------------------------------------------------


def _list(api: ApiClient, path: str, query: list[tuple[str, str]], args: argparse.Namespace,
          show: Callable[[list[Json]], None]) -> int:  # fmt: skip
    """One page of ``path`` (``--limit``, ``--cursor``), or every page with ``--all``."""
    limit, cursor, items = args.limit or (PAGE_SIZE_ALL if args.all else None), args.cursor, []
    while True:
        extra = ([("limit", str(limit))] if limit else []) + ([("cursor", cursor)] if cursor else [])
        page = api.get(path, query + extra).body
        items += page["items"]
        cursor = page["next_cursor"]
        if not (args.all and cursor):
            break
    if args.json:
        output.print_json({"items": items, "next_cursor": cursor})
        return 0
    show(items)
    if cursor:
        print(f"more: add --cursor {cursor} for the next page, or --all for every one", file=sys.stderr)
    return 0


def jobs_submit(api: ApiClient, args: argparse.Namespace) -> int:
    body: Json = {"type": args.type, "payload": args.payload or {}, "labels": dict(args.label or [])}
    optional = {"priority": args.priority, "delay_seconds": args.delay, "run_at": args.run_at,
                "max_attempts": args.max_attempts, "timeout_seconds": args.timeout}  # fmt: skip
    body.update({name: value for name, value in optional.items() if value is not None})
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    answer = api.post("/v1/jobs", body, headers)
    job = answer.body
    if args.json:
        output.print_json(job)
        return 0
    how = "already submitted with this key" if answer.headers.get("Idempotent-Replayed") else "submitted"
    print(f"{how}: {job['type']} job, {job['status']}; follow it with: conveyor jobs watch {job['id']}",
          file=sys.stderr)  # fmt: skip
    print(job["id"])  # alone on stdout, so that JOB=$(conveyor jobs submit ...) captures it
    return 0


def jobs_get(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.get(f"/v1/jobs/{args.id}").body
    output.print_json(job) if args.json else output.print_job(job)
    return 0


def jobs_list(api: ApiClient, args: argparse.Namespace) -> int:
    query = [("status", s) for s in args.status or []] + [("type", t) for t in args.type or []]
    query += [("label", f"{k}:{v}") for k, v in args.label or []]
    query += [
        (n, getattr(args, n)) for n in ("tenant", "created_after", "created_before") if getattr(args, n)
    ]
    return _list(api, "/v1/jobs", query, args, output.jobs_table)


def jobs_cancel(api: ApiClient, args: argparse.Namespace) -> int:
    answer = api.post(f"/v1/jobs/{args.id}/cancel")
    if args.json:
        output.print_json(answer.body)
    elif answer.status == 202:
        print(f"cancel requested: job {args.id} is running; its handler is told and may stop, and the job "
              "will not be retried")  # fmt: skip
    else:
        print(f"cancelled job {args.id}; it will not run")
    return 0


def jobs_retry(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.post(f"/v1/jobs/{args.id}/retry").body
    if args.json:
        output.print_json(job)
    else:
        print(f"job {job['id']} is {job['status']} again, with {job['max_attempts']} fresh attempt(s)")
    return 0


def jobs_watch(api: ApiClient, args: argparse.Namespace) -> int:
    out: TextIO = sys.stderr if args.json else sys.stdout
    live, shown = out.isatty(), ""
    while True:
        try:
            answer = api.get(f"/v1/jobs/{args.id}")
        except ApiProblem as exc:
            if exc.status != 503:  # 503: Postgres is briefly away, keep watching
                raise
            time.sleep(min(exc.retry_after or 1.0, args.max_interval))
            continue
        job, line = answer.body, output.progress_line(answer.body)
        if live:  # redraw one line in place; in a log or a pipe, one line per change instead
            out.write(f"\r{line}\x1b[K")
            out.flush()
        elif line != shown:
            print(line, file=out, flush=True)
        shown = line
        if job["status"] in FINISHED:
            break
        time.sleep(min(max(answer.retry_after or 1.0, 0.1), args.max_interval))
    if live:
        print(file=out)
    if job["status"] != JobStatus.SUCCEEDED and job.get("error"):
        print(f"error: {output.error_text(job)}", file=sys.stderr)
    if args.json:
        output.print_json(job)
    return 0 if job["status"] == JobStatus.SUCCEEDED else 1


def _dlq_filters(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = [(name, value) for name in REPEATABLE_FILTERS for value in getattr(args, name) or []]
    return pairs + [
        (n, getattr(args, n)) for n in ("tenant", "dead_after", "dead_before") if getattr(args, n)
    ]


def dlq_list(api: ApiClient, args: argparse.Namespace) -> int:
    return _list(api, "/v1/dead-letters", _dlq_filters(args), args, output.dead_letters_table)


def dlq_select(api: ApiClient, args: argparse.Namespace, *, action: str) -> int:
    """``dlq replay`` and ``dlq purge``: act on the dead letters the filters (or ``--all``) select."""
    body: Json = {"all": True} if args.all else {}
    for name, value in _dlq_filters(args):
        if name in REPEATABLE_FILTERS:
            body.setdefault(name, []).append(value)
        else:
            body[name] = value
    result = api.post(f"/v1/dead-letters/{action}", body).body
    if args.json:
        output.print_json(result)
    elif action == "replay":
        print(f"replayed {result['replayed']} job(s): queued again with fresh attempts")
    else:
        print(f"purged {result['purged']} dead letter(s)")
    return 0


def queues(api: ApiClient, args: argparse.Namespace) -> int:
    stats = api.get("/v1/queues").body
    output.print_json(stats) if args.json else output.queues_table(stats)
    return 0


# --- the command tree ------------------------------------------------------------------------------


def _remote(command: Command) -> Callable[[Settings, argparse.Namespace], int]:
    """A handler for ``shared.cli.main``: runs ``command``, printing a failure as ``conveyor ...: why``."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        name = " ".join(filter(None, ["conveyor", args.command, getattr(args, "action", None)]))
        key = args.key or os.environ.get("CONVEYOR_API_KEY") or None
        try:
            return command(ApiClient(args.url, key), args)
        except ApiProblem as exc:
            first, *details = exc.lines()
            print("\n".join([f"{name}: {first}", *details]), file=sys.stderr)
        except ClientError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        return 1

    return run


def _add(commands: Any, name: str, command: Command, common: argparse.ArgumentParser, text: str) -> Any:
    parser = commands.add_parser(name, parents=[common], help=text, description=text)
    parser.set_defaults(handler=_remote(command))
    return parser


def _page_size(raw: str) -> int:
    """``--limit``: 1-200, as the API takes it (0 used to mean the default page size, silently)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 200")
    return value


def _add_pages(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--limit", type=_page_size, metavar="N", help=f"{what} per page, 1-200 (default 50)")
    parser.add_argument("--cursor", help="start after a page: the next_cursor it ended with")
    parser.add_argument("--all", action="store_true", help="follow next_cursor to the last page")


def _add_dlq_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", action="append", metavar="TYPE", help="job type (repeat for several)")
    parser.add_argument("--queue", action="append", metavar="QUEUE", help="queue, e.g. default (repeat)")
    parser.add_argument(
        "--error-type", action="append", metavar="ERROR", help="error type as listed (repeat)"
    )
    parser.add_argument("--tenant", help="one tenant's dead letters (admin keys)")
    parser.add_argument("--dead-after", type=_time, metavar="TIME", help="died at or after this ISO time")
    parser.add_argument("--dead-before", type=_time, metavar="TIME", help="died before this ISO time")


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", type=_base_url, default=os.environ.get("CONVEYOR_URL", DEFAULT_URL),
                        help=f"the API's base URL (env CONVEYOR_URL; default {DEFAULT_URL})")  # fmt: skip
    common.add_argument("--key", help="an API key; better in env CONVEYOR_API_KEY (none: no Authorization)")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    jobs = commands.add_parser("jobs", help="submit, list, follow, cancel and retry jobs (over HTTP)")
    job_commands = jobs.add_subparsers(dest="action", required=True)
    submit = _add(job_commands, "submit", jobs_submit, common, "submit a job; prints its id")
    submit.add_argument("type", help="a registered job type, e.g. demo.sleep")
    submit.add_argument("--payload", type=_json_object, metavar="JSON", help="a JSON object, or @file")
    submit.add_argument("--priority", type=int, metavar="N", help="0-9, higher runs first")
    start = submit.add_mutually_exclusive_group()
    start.add_argument("--delay", type=float, metavar="SECONDS", help="start no earlier than this from now")
    start.add_argument("--run-at", type=_time, metavar="TIME", help="start no earlier than this ISO time")
    submit.add_argument("--max-attempts", type=int, metavar="N", help="attempts in all, the first included")
    submit.add_argument("--timeout", type=int, metavar="SECONDS", help="longest one attempt may run")
    submit.add_argument("--label", type=_label, action="append", metavar="KEY=VALUE", help="repeatable")
    submit.add_argument("--idempotency-key", metavar="KEY", help="resubmitting with it returns the same job")
    for name, command, text in [
        ("get", jobs_get, "show a job"),
        ("cancel", jobs_cancel, "cancel a waiting job, or ask a running one to stop"),
        ("retry", jobs_retry, "run a failed or cancelled job again, with fresh attempts"),
        ("watch", jobs_watch, "follow a job with a progress bar; exit 0 if it succeeds, 1 if not"),
    ]:
        _add(job_commands, name, command, common, text).add_argument("id", type=_job_id, help="the job id")
    watch = job_commands.choices["watch"]
    watch.add_argument("--max-interval", type=float, default=MAX_POLL_SECONDS, metavar="SECONDS",
                        help=f"longest wait between two polls (default {MAX_POLL_SECONDS:g})")  # fmt: skip
    listing = _add(job_commands, "list", jobs_list, common, "list jobs, newest first")
    listing.add_argument("--status", action="append", choices=[s.value for s in JobStatus], help="repeatable")
    listing.add_argument("--type", action="append", metavar="TYPE", help="job type (repeat for several)")
    listing.add_argument("--label", type=_label, action="append", metavar="KEY=VALUE", help="all must match")
    listing.add_argument("--tenant", help="one tenant's jobs (admin keys)")
    listing.add_argument("--created-after", type=_time, metavar="TIME", help="created at or after this")
    listing.add_argument("--created-before", type=_time, metavar="TIME", help="created before this")
    _add_pages(listing, "jobs")

    dlq = commands.add_parser("dlq", help="list, replay and purge dead letters (over HTTP)")
    dlq_commands = dlq.add_subparsers(dest="action", required=True)
    dlq_listing = _add(dlq_commands, "list", dlq_list, common, "list dead letters, newest first")
    _add_dlq_filters(dlq_listing)
    _add_pages(dlq_listing, "dead letters")
    for name, command, text in [
        (
            "replay",
            partial(dlq_select, action="replay"),
            "queue the matching dead letters' jobs again (admin); prints how many",
        ),
        (
            "purge",
            partial(dlq_select, action="purge"),
            "delete the matching dead letters (admin); prints how many",
        ),
    ]:
        parser = _add(dlq_commands, name, command, common, text)
        _add_dlq_filters(parser)
        parser.add_argument("--all", action="store_true", help="every dead letter (needed without a filter)")

    _add(commands, "queues", queues, common, "queue depths, delays, dead letters, outbox backlog (admin)")
