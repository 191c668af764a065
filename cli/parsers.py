"""argparse for the HTTP commands (`datasets`, `jobs`, `artifacts`, `generate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import commands
from cli.generate import add_generate_parser

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")


def add_connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--url / --api-key, accepted before the command and after it. The leaf parsers' defaults are
    suppressed, so a value given before the command is not overwritten by a leaf default."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--url", default=default, help="API base URL (env ATELIER_URL; default http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", default=default, help="API key (env ATELIER_API_KEY)")


def _leaf(
    sub: argparse._SubParsersAction,
    name: str,
    handler,
    parents: list,
    help: str,  # type: ignore[no-untyped-def]
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, parents=parents, help=help, description=help)
    parser.set_defaults(func=commands.run_http, http=handler)
    return parser


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, help="rows per page (1-100)")
    parser.add_argument("--after", help="the last id of the previous page")


def _delete(group: argparse._SubParsersAction, conn: list, collection: str, help: str) -> None:
    parser = _leaf(group, "delete", commands.delete, conn, help)
    parser.add_argument("id")
    parser.set_defaults(collection=collection)


def _datasets(sub: argparse._SubParsersAction, conn: list) -> None:
    group = sub.add_parser("datasets", help="upload and inspect datasets").add_subparsers(
        dest="datasets_command", required=True
    )
    upload = _leaf(group, "upload", commands.datasets_upload, conn, "upload a folder or a zip")
    upload.add_argument("path", metavar="DIR|ZIP", help="images + same-name .txt captions (+ conditioning/)")
    upload.add_argument("--name")
    _paging(_leaf(group, "list", commands.datasets_list, conn, "list datasets"))
    _leaf(group, "show", commands.datasets_show, conn, "a dataset with its validation report").add_argument(
        "id"
    )
    _delete(group, conn, "datasets", "delete a dataset and its images (refused while a job trains on it)")


def _jobs(sub: argparse._SubParsersAction, conn: list) -> None:
    group = sub.add_parser("jobs", help="training jobs").add_subparsers(dest="jobs_command", required=True)
    create = _leaf(group, "create", commands.jobs_create, conn, "queue a training job")
    create.add_argument("--method", help="lora, dreambooth, textual_inversion, hypernetwork, controlnet, ...")
    create.add_argument("--dataset", help="dataset id")
    create.add_argument("--base-model", help="e.g. tiny-sd")
    create.add_argument("--params", type=Path, metavar="FILE.yaml", help="the params object")
    create.add_argument("--training", type=Path, metavar="FILE.yaml", help="the training object")
    create.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one field, e.g. training.max_steps=200 or params.rank=8 (repeatable)",
    )
    create.add_argument("--idempotency-key", help="re-running with the same key never trains twice")
    create.add_argument("--webhook-url", help="https URL that receives signed job events")
    create.add_argument(
        "--webhook-events",
        metavar="EVENT,...",
        help="started,checkpoint,succeeded,failed,canceled (default: all but checkpoint)",
    )
    create.add_argument("--watch", action="store_true", help="then follow it like `jobs watch`")
    watch = _leaf(group, "watch", commands.jobs_watch, conn, "follow a job's progress to its end")
    watch.add_argument("id")
    _leaf(group, "cancel", commands.jobs_cancel, conn, "cancel a job").add_argument("id")
    listing = _leaf(group, "list", commands.jobs_list, conn, "list jobs, newest first")
    listing.add_argument("--status", choices=JOB_STATUSES)
    _paging(listing)
    _leaf(group, "show", commands.jobs_show, conn, "a job as JSON").add_argument("id")
    _delete(group, conn, "jobs", "delete a finished job: checkpoints, samples, events (not its artifact)")


def _artifacts(sub: argparse._SubParsersAction, conn: list) -> None:
    group = sub.add_parser("artifacts", help="trained artifacts").add_subparsers(
        dest="artifacts_command", required=True
    )
    download = _leaf(group, "download", commands.artifacts_download, conn, "download an artifact's file(s)")
    download.add_argument("id")
    download.add_argument(
        "--format", help="diffusers (default), or kohya/a1111/comfyui, single_file, bin as the method offers"
    )
    download.add_argument("-o", "--output", help="file or folder (default: here, the server's file name)")
    download.add_argument("--all", action="store_true", help="every file of the format, into folder -o")
    _leaf(group, "show", commands.artifacts_show, conn, "an artifact and its manifest").add_argument("id")
    _paging(_leaf(group, "list", commands.artifacts_list, conn, "list artifacts"))
    _delete(group, conn, "artifacts", "delete an artifact and all its files, exports included")


def add_http_commands(sub: argparse._SubParsersAction) -> None:
    conn_parser = argparse.ArgumentParser(add_help=False)
    add_connection_options(conn_parser, suppress=True)
    conn = [conn_parser]
    _datasets(sub, conn)
    _jobs(sub, conn)
    _artifacts(sub, conn)
    add_generate_parser(sub, conn).set_defaults(func=commands.run_http)
