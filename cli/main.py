"""`atelier`: the HTTP commands (datasets, jobs, artifacts, generate), the server roles (serve,
worker, beat), `keys create|list|revoke`, `tenants limits show|set|clear`, `tiny build|check`, and `demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cli.parsers import add_connection_options, add_http_commands
from core.logs import configure_logging, log_level

# Long-running roles log JSON lines for a log collector; the interactive commands log text for people.
SERVER_ROLES = ("serve", "worker", "beat")


def _keys(args: argparse.Namespace) -> int:
    from cli.keys import run_keys_command

    return run_keys_command(args)


def _serve(args: argparse.Namespace) -> int:
    from cli.server import run_api

    return run_api(host=args.host, port=args.port, with_worker=not args.no_worker)


def _worker(args: argparse.Namespace) -> int:
    if args.metrics_port:
        # First: prometheus_client must be imported after its multiprocess folder is set.
        from worker.metrics import serve_worker_metrics

        serve_worker_metrics(port=args.metrics_port)
    from cli.server import run_worker

    run_worker(
        queues=args.queues,
        concurrency=args.concurrency,
        max_tasks_per_child=args.max_tasks_per_child or None,
        beat=args.beat,
        loglevel=logging.getLevelName(log_level(args.loglevel)),
        parent_pid=args.parent_pid,
    )
    return 0


def _beat(args: argparse.Namespace) -> int:
    from cli.server import run_beat

    run_beat(loglevel=logging.getLevelName(log_level(args.loglevel)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(out_dir=args.out, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description=__doc__)
    add_connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_http_commands(sub)

    serve = sub.add_parser("serve", help="run the HTTP API (embedded mode also starts a worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="train,generate,maintenance")
    worker.add_argument("--concurrency", type=int, default=1, help="one per GPU")
    worker.add_argument("--max-tasks-per-child", type=int, default=1, help="0: keep children (generate)")
    worker.add_argument("--beat", action="store_true", help="also run the reaper schedule in this process")
    worker.add_argument("--loglevel", help="default: env ATELIER_LOG_LEVEL, else INFO")
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("ATELIER_METRICS_PORT", 0),  # a string is converted (and checked) by type
        help="serve GPU memory metrics for Prometheus on this port (env ATELIER_METRICS_PORT; 0: off)",
    )
    # Set by `serve` for its embedded workers: stop when that process dies.
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    worker.set_defaults(func=_worker)

    beat = sub.add_parser("beat", help="run the reaper schedule")
    beat.add_argument("--loglevel", help="default: env ATELIER_LOG_LEVEL, else INFO")
    beat.set_defaults(func=_beat)

    keys = sub.add_parser("keys", help="API keys (on the database: run where the server's settings are)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a label for people, e.g. ci or laptop")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 2w (default: never)")
    listing = keys_sub.add_parser("list", help="keys with their state, creation and last use")
    listing.add_argument("--tenant", help="a tenant's name or id (default: every tenant)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key: its next request gets 401")
    revoke.add_argument("key_id", metavar="KEY_ID")
    keys.set_defaults(func=_keys)

    from cli.tenants import add_tenants_parser
    from cli.tiny import add_tiny_parser

    add_tenants_parser(sub)
    add_tiny_parser(sub)

    demo = sub.add_parser("demo", help="train a LoRA end to end on the embedded service")
    demo.add_argument("--out", default="atelier-demo", help="folder for the grid and loss curve")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: tuned for the demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # ATELIER_LOG_FORMAT / ATELIER_LOG_LEVEL override these defaults (core/logs.py). Interactive
        # commands print their own output; library INFO lines (migrations, loaders) would bury it.
        server = args.command in SERVER_ROLES
        quiet = None if server or os.environ.get("ATELIER_LOG_LEVEL") else "WARNING"
        configure_logging(default_format="json" if server else "text", level=quiet)
    except ValueError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll drowns the progress bar
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
