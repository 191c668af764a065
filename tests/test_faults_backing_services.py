"""Faults on the full stack (issue 11), a backing service failing mid-job: Redis restarted, PostgreSQL
unavailable for 30 s, the S3 server down while the artifact uploads. Faults are injected without
touching the machine's shared services: a private Redis, and relays in front of PostgreSQL and the
S3 server. Each case checks what a user relies on: no job lost, none run or stored twice, none
stuck, and prints how long the stack took to recover (tests/fault_injection.py records it in
recovery.json under the test's folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cli.client import ApiProblem
from tests import fault_fixtures as fixtures
from tests.fault_fixtures import (
    TERMINAL,
    artifact_folders,
    assert_ran_once,
    job_body,
    job_events,
    job_or_none,
    new_dataset,
    stack_logs,
    wait_for,
    wait_terminal,
)
from tests.fault_injection import CuttableRelay, PrivateRedis, RecoveryLog
from tests.s3_server import S3Server
from tests.service_stack import Stack

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The stack and its private Redis (tests/fault_fixtures.py), shared by assignment.
recovery, private_redis, redis_url, stack = (
    fixtures.recovery,
    fixtures.private_redis,
    fixtures.redis_url,
    fixtures.stack,
)


# --- Redis restarted mid-job -------------------------------------------------------------------------


def test_redis_restart_mid_job_loses_no_job(
    private_redis: PrivateRedis, stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    assert stack.env["ATELIER_BROKER_URL"] == private_redis.url
    # A queued job whose message died with Redis is re-sent once it waited this long unclaimed.
    stack.env["ATELIER_QUEUED_REDISPATCH_S"] = "10"
    stack.start_api()
    stack.start_workers()
    stack.wait_consuming("worker")
    stack.wait_consuming("worker-generate")
    client = stack.client("acme")
    dataset = new_dataset(client, tmp_path, "acme")
    # Long enough to be mid-training at the restart: on an idle machine tiny-sd trains ~50 steps a
    # second, and 40 steps were done before Redis went down (the test then waited for a finished
    # job to go on).
    running = client.create_job(job_body(dataset, max_steps=400, checkpoint_every=20))["id"]
    wait_for("the first job to train", lambda: client.job(running)["progress"]["step"] >= 2, stack)
    # One training worker, one job at a time: the second waits in Redis, taken by no worker yet.
    waiting = client.create_job(job_body(dataset, seed=2))["id"]
    assert client.job(waiting)["status"] == "queued"

    private_redis.restart()  # killed, back empty: both jobs' messages are gone
    cleared = time.monotonic()
    at_restart = client.job(running)
    assert at_restart["status"] == "running", f"the job was no longer running at the fault: {at_restart}"
    step_at_restart = at_restart["progress"]["step"]
    wait_for(
        "the running job to go on", lambda: client.job(running)["progress"]["step"] > step_at_restart, stack
    )
    running_again = time.monotonic() - cleared
    wait_for("the waiting job to start", lambda: client.job(waiting)["status"] != "queued", stack)
    waiting_started = time.monotonic() - cleared
    # The worker consumes again: a job created after the restart runs too.
    after = client.create_job(job_body(dataset, seed=3))["id"]

    jobs = [running, waiting, after]
    finals = {running: wait_terminal(client, running, stack)}
    running_done = time.monotonic() - cleared
    finals |= {job_id: wait_terminal(client, job_id, stack) for job_id in jobs[1:]}
    all_done = time.monotonic() - cleared
    folders = artifact_folders(s3_server, stack)
    for job_id in jobs:
        assert finals[job_id]["status"] == "succeeded", (finals[job_id]["error"], stack_logs(stack))
        assert_ran_once(client, job_id, folders)
    for name, process in stack.processes.items():
        assert process.poll() is None, f"{name} exited\n{stack_logs(stack)}"
    attempts = {finals[j]["attempt"] for j in jobs}
    recovery.record(
        "redis_restart",
        f"running job went on (attempts {sorted(attempts)}); the queued job's lost message was re-sent "
        "by the beat; a new job ran",
        running_job_progress=running_again,
        running_job_succeeded=running_done,
        queued_job_started=waiting_started,
        all_three_succeeded=all_done,
    )


# --- PostgreSQL unavailable for 30 s mid-job ---------------------------------------------------------

OUTAGE_S = 30.0


def test_postgres_down_30s_mid_job(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    port = int(stack.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    relay = CuttableRelay("127.0.0.1", port)
    try:
        stack.env["ATELIER_DATABASE_URL"] = stack.database_url.replace(f":{port}/", f":{relay.port}/")
        stack.start_api()
        stack.start_workers()
        stack.wait_consuming("worker")
        stack.wait_consuming("worker-generate")
        client = stack.client("acme")
        dataset = new_dataset(client, tmp_path, "acme")
        job_id = client.create_job(job_body(dataset, max_steps=60, checkpoint_every=10))["id"]
        wait_for("a checkpoint", lambda: client.job(job_id)["checkpoint_step"], stack)

        relay.cut()
        cut_at = time.monotonic()
        # The API cannot read the job now: it answers a problem, retryable, never a wrong job.
        with pytest.raises(ApiProblem) as down:
            client.job(job_id)
        assert down.value.status == 503 and down.value.body["code"] == "database_unavailable"
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
        relay.restore()
        cleared = time.monotonic()

        def api_answers() -> dict[str, Any] | None:
            return job_or_none(client, job_id)

        before = wait_for("the API to answer again", api_answers, stack, timeout_s=60)
        api_back = time.monotonic() - cleared

        def progressing() -> bool:
            job = job_or_none(client, job_id)
            return bool(job) and (
                job["status"] in TERMINAL
                or job["attempt"] > before["attempt"]
                or (job["status"] == "running" and job["progress"]["step"] > before["progress"]["step"])
            )

        wait_for("the job to run again", progressing, stack)
        running_again = time.monotonic() - cleared
        final = wait_terminal(client, job_id, stack, timeout_s=240)
        finished = time.monotonic() - cleared
        assert final["status"] == "succeeded", (final["error"], stack_logs(stack))
        job = assert_ran_once(client, job_id, artifact_folders(s3_server, stack))
        resumed = [e for e in job_events(client, job_id) if e["type"] == "resumed"]
        if job["attempt"] > 1:  # a later attempt went on from a checkpoint, not from scratch
            assert resumed and resumed[-1]["data"]["from_step"] > 0
        for name, process in stack.processes.items():
            assert process.poll() is None, f"{name} exited\n{stack_logs(stack)}"
        recovery.record(
            "postgres_down_30s",
            f"API answered 503 database_unavailable; job finished on attempt {job['attempt']}"
            + (f", resumed from step {resumed[-1]['data']['from_step']}" if resumed else ""),
            api_answers=api_back,
            job_running_again=running_again,
            job_succeeded=finished,
        )
    finally:
        stack.stop()
        relay.close()


# --- the S3 server down while the artifact uploads ---------------------------------------------------

S3_DOWN_S = 20.0


def test_s3_down_while_the_artifact_uploads(
    stack: Stack, s3_server: S3Server, tmp_path: Path, recovery: RecoveryLog
) -> None:
    host, port = s3_server.endpoint_url.rsplit("/", 1)[1].split(":")
    relay = CuttableRelay(host, int(port))
    try:
        stack.env["ATELIER_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{relay.port}"
        stack.start_api()
        stack.start_workers()
        stack.wait_consuming("worker")
        stack.wait_consuming("worker-generate")
        client = stack.client("acme")
        dataset = new_dataset(client, tmp_path, "acme")
        # No checkpoints and no samples: once the data is loaded, only the artifact needs S3.
        job_id = client.create_job(job_body(dataset, max_steps=40))["id"]
        wait_for("training to begin", lambda: client.job(job_id)["progress"]["step"] >= 1, stack)
        relay.cut()
        wait_for("the artifact upload to hit the dead S3 server", lambda: relay.refused, stack)
        time.sleep(S3_DOWN_S)
        assert client.job(job_id)["status"] == "running", stack_logs(stack)  # waiting, not failed
        relay.restore()
        cleared = time.monotonic()
        final = wait_terminal(client, job_id, stack)
        finished = time.monotonic() - cleared
        assert final["status"] == "succeeded", (final["error"], stack_logs(stack))
        # The trained result was kept: the same attempt stored it once S3 came back.
        job = assert_ran_once(client, job_id, artifact_folders(s3_server, stack))
        assert job["attempt"] == 1
        recovery.record(
            "s3_down_during_artifact_upload",
            f"upload retried with backoff ({relay.refused} refused connections over {S3_DOWN_S:.0f} s); "
            "the same attempt stored the artifact",
            job_succeeded=finished,
        )
    finally:
        stack.stop()
        relay.close()
