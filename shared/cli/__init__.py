"""The ``conveyor`` command: run the services, migrate the database, manage tenants and API keys, and
operate jobs through the HTTP API.

    conveyor migrate                 create the database if needed and apply pending migrations
    conveyor run                     run api + worker + relay in the foreground; Ctrl-C stops all three
    conveyor api | worker | relay    run one process (extra arguments go to gunicorn / dramatiq)
    conveyor settings                print every setting and its current value (secrets hidden)
    conveyor worker-alive --max-age S   liveness probe: exit 1 if a worker process stopped beating
    conveyor relay-alive --max-age S    liveness probe: exit 1 if the relay stopped going round
    conveyor keys create|list|revoke        API keys
    conveyor tenants create|list|set        tenants and their limits
    conveyor jobs submit|get|list|cancel|retry|watch   jobs, over HTTP (--url, --key)
    conveyor dlq list|replay|purge                     dead letters, over HTTP
    conveyor queues                                    queue statistics, over HTTP

Errors are printed as one line on stderr with a non-zero exit code (2 for a usage mistake).
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg2
import psycopg2.errors

from shared.cli import admin, probes, processes, remote
from shared.errors import StoreUnavailable
from shared.logs import configure_logging
from shared.settings import SettingsError, get_settings

PROCESS_COMMANDS = {
    "migrate": processes.cmd_migrate,
    "run": processes.cmd_run,
    "api": processes.cmd_api,
    "worker": processes.cmd_worker,
    "relay": processes.cmd_relay,
    "settings": processes.cmd_settings,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in PROCESS_COMMANDS.items():
        sub = commands.add_parser(name, help=(command.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        sub.set_defaults(process=command)
    admin.add_parsers(commands)
    probes.add_parsers(commands)
    remote.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    process = PROCESS_COMMANDS.get(argv[0]) if argv else None
    if process is not None and not {"-h", "--help"} & set(argv[1:]):
        # Everything after a process command goes to the program it runs (e.g. `conveyor worker -Q q`),
        # which argparse's REMAINDER cannot pass on when it starts with a dash.
        args, extra = None, argv[1:]
    else:
        args, extra = build_parser().parse_args(argv), []
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args is None:
        assert process is not None
        return int(process(settings, extra))
    if hasattr(args, "process"):
        return int(args.process(settings, args.extra))
    try:
        return int(args.handler(settings, args))
    except admin.UsageError as exc:
        print(f"conveyor {args.command} {args.action}: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(
            f"conveyor: cannot reach Postgres at {settings.redacted_database_url()}: {exc}", file=sys.stderr
        )
        return 1
    except psycopg2.errors.UndefinedTable as exc:
        print(
            f"conveyor: the database at {settings.redacted_database_url()} has no Conveyor tables "
            f"({_first_line(exc)}); run `conveyor migrate` first",
            file=sys.stderr,
        )
        return 1
    except psycopg2.Error as exc:
        print(f"conveyor: Postgres refused: {_first_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`conveyor dlq list --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 1


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
