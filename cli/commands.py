"""The HTTP commands `datasets`, `jobs` and `artifacts` (and the runner `generate` shares), all
through AtelierClient; each group has `delete`.

Each handler takes the parsed arguments and a client and returns the exit code; `run_http` makes
the client and turns API problems and connection errors into a message on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path, PurePosixPath

import httpx

from cli.client import ApiProblem, AtelierClient
from cli.jobspec import build_job_body
from cli.output import CliError, dataset_summary, emit, emit_json, problem_lines, say, table
from cli.progress import ProgressBar
from cli.watch import EXIT_CODES, watch_job

PRIMARY_FORMAT = "diffusers"


def make_client(args: argparse.Namespace) -> AtelierClient:
    """The client for a command (tests replace this to talk to an in-process app)."""
    try:
        return AtelierClient.from_env(getattr(args, "url", None), getattr(args, "api_key", None))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def run_http(args: argparse.Namespace) -> int:
    try:
        client = make_client(args)
        try:
            return args.http(args, client)
        finally:
            client.close()
    except ApiProblem as problem:
        for line in problem_lines(problem):
            say(line)
        return 1
    except httpx.HTTPError as exc:
        where = exc.request.url if _has_request(exc) else "the server"
        say(f"error: cannot talk to {where}: {exc or type(exc).__name__}")
        return 1
    except (CliError, TimeoutError, OSError) as exc:
        # OSError: a local file (a download target, a YAML file) that cannot be written or read.
        say(f"error: {exc}")
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        say("interrupted (a job keeps running on the server)")
        return 130


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when the error carries no request
    except RuntimeError:
        return False
    return True


def delete(args: argparse.Namespace, client: AtelierClient) -> int:
    """`datasets|jobs|artifacts delete ID`: the object and its files in storage."""
    deleted = client.delete(args.collection, args.id)
    say(f"{deleted['object']} {deleted['id']} deleted, with its files")
    emit(deleted["id"])
    return 0


# --- datasets -----------------------------------------------------------------------------------


def datasets_upload(args: argparse.Namespace, client: AtelierClient) -> int:
    path = Path(args.path)
    if path.is_dir():
        try:
            upload = client.upload_folder(path, name=args.name)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if upload.skipped:
            say(
                f"skipped {len(upload.skipped)} file(s) that are not images or captions: "
                + ", ".join(upload.skipped[:10])
                + (" ..." if len(upload.skipped) > 10 else "")
            )
        dataset = upload.dataset
    elif path.is_file() and path.suffix.casefold() == ".zip":
        dataset = client.upload_dataset([path], name=args.name)
    else:
        raise CliError(f"{path}: expected a folder or a .zip file")
    for line in dataset_summary(dataset):
        say(line)
    emit(dataset["id"])
    return 0


def datasets_list(args: argparse.Namespace, client: AtelierClient) -> int:
    page = client.datasets(limit=args.limit, after=args.after)
    rows = [(d["id"], d["status"], d["image_count"], d["name"], d["created_at"]) for d in page["data"]]
    emit(table(("ID", "STATUS", "IMAGES", "NAME", "CREATED"), rows))
    _more(page)
    return 0


def datasets_show(args: argparse.Namespace, client: AtelierClient) -> int:
    emit_json(client.dataset(args.id))
    return 0


def _more(page: dict) -> None:
    if page["has_more"] and page["data"]:
        say(f"more: --after {page['data'][-1]['id']}")


# --- jobs ---------------------------------------------------------------------------------------


def jobs_create(args: argparse.Namespace, client: AtelierClient) -> int:
    body = build_job_body(
        method=args.method,
        dataset_id=args.dataset,
        base_model=args.base_model,
        params_file=args.params,
        training_file=args.training,
        sets=args.set,
    )
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    if args.webhook_events:
        body["webhook_events"] = [e.strip() for e in args.webhook_events.split(",") if e.strip()]
    # One key per invocation: httpx retries nothing, but a user re-running after a timeout can pass
    # --idempotency-key to be sure no second job trains.
    job = client.create_job(body, idempotency_key=args.idempotency_key or str(uuid.uuid4()))
    say(
        f"job {job['id']} {job['status']}: {job['method']} on {job['base_model']}, "
        f"{job['progress']['total']} steps"
    )
    emit(job["id"])
    return _watch(client, job["id"]) if args.watch else 0


def jobs_watch(args: argparse.Namespace, client: AtelierClient) -> int:
    return _watch(client, args.id)


def _watch(client: AtelierClient, job_id: str) -> int:
    job = watch_job(client, job_id, ProgressBar(label=job_id))
    status = job["status"]
    if status == "succeeded":
        say(f"job {job_id} succeeded; artifact:")
        emit(job["artifact_id"])
    else:
        error = job.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        say(f"job {job_id} {status}{reason}")
    return EXIT_CODES.get(status, 1)


def jobs_cancel(args: argparse.Namespace, client: AtelierClient) -> int:
    job = client.cancel(args.id)
    if job["status"] == "canceled":
        say(f"job {job['id']} canceled")
    else:
        say(f"job {job['id']} is {job['status']}; cancellation requested (it stops at its next step)")
    emit(f"{job['id']} {job['status']}")
    return 0


def jobs_list(args: argparse.Namespace, client: AtelierClient) -> int:
    page = client.jobs(status=args.status, limit=args.limit, after=args.after)
    rows = [
        (
            j["id"],
            j["status"],
            j["method"],
            j["base_model"],
            f"{j['progress']['step']}/{j['progress']['total']}",
            "" if j["progress"]["loss"] is None else f"{j['progress']['loss']:.4f}",
            j["artifact_id"],
            j["created_at"],
        )
        for j in page["data"]
    ]
    emit(table(("ID", "STATUS", "METHOD", "BASE", "STEP", "LOSS", "ARTIFACT", "CREATED"), rows))
    _more(page)
    return 0


def jobs_show(args: argparse.Namespace, client: AtelierClient) -> int:
    emit_json(client.job(args.id))
    return 0


# --- artifacts ----------------------------------------------------------------------------------


def artifacts_download(args: argparse.Namespace, client: AtelierClient) -> int:
    fmt = args.format or None
    if args.all:
        out = Path(args.output or args.id)
        for name in _format_files(client.artifact(args.id), fmt or PRIMARY_FORMAT):
            emit(str(client.download_artifact(args.id, out / name, file=name, format=fmt)))
        return 0
    dest = Path(args.output) if args.output else Path.cwd()
    if args.output and args.output.endswith(("/", os.sep)):
        dest.mkdir(parents=True, exist_ok=True)  # "-o weights/" names a folder, even a new one
    emit(str(client.download_artifact(args.id, dest, format=fmt)))
    return 0


def _format_files(artifact: dict, fmt: str) -> list[str]:
    """Every file of one format, as the manifest lists it (names checked to stay inside the folder)."""
    manifest = artifact["manifest"]
    exports: dict[str, list[str]] = manifest.get("exports") or {}
    if fmt == PRIMARY_FORMAT:
        exported = {name for names in exports.values() for name in names}
        names = [f["name"] for f in manifest.get("files", []) if f["name"] not in exported]
        names.append("manifest.json")
    elif fmt in exports:
        names = list(exports[fmt])
    else:
        offered = ", ".join([PRIMARY_FORMAT, *exports]) or PRIMARY_FORMAT
        raise CliError(f"artifact {artifact['id']} has no {fmt} files to list; --all takes: {offered}")
    for name in names:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise CliError(f"artifact {artifact['id']} lists an unsafe file name {name!r}", exit_code=1)
    return names


def artifacts_show(args: argparse.Namespace, client: AtelierClient) -> int:
    emit_json(client.artifact(args.id))
    return 0


def artifacts_list(args: argparse.Namespace, client: AtelierClient) -> int:
    page = client.artifacts(limit=args.limit, after=args.after)
    rows = [(a["id"], a["method"], a["base_model"], a["job_id"], a["created_at"]) for a in page["data"]]
    emit(table(("ID", "METHOD", "BASE", "JOB", "CREATED"), rows))
    _more(page)
    return 0
