"""The fault generations' leases exist for, on the full stack (PostgreSQL, a Redis of the test's own,
S3): the generate worker SIGKILLed mid-generation; the reaper re-queues the generation, the next
worker finishes it exactly once, and its images are stored once.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from core.db import session_scope
from core.generation.images import generation_prefix
from tests import generation_fixtures
from tests.generation_fixtures import TERMINAL, fresh_row, full_log, s3_objects, wait_for
from tests.s3_server import S3Server
from tests.service_stack import Stack

# A fixture is found by its name in the test's module: full_stack gets a Redis of this test's own.
redis_url = generation_fixtures.redis_url


@pytest.mark.services
@pytest.mark.slow
def test_generate_worker_killed_mid_generation_finishes_once_with_its_images_stored_once(
    full_stack: Stack, s3_server: S3Server
) -> None:
    from worker.lifecycle import child_pids

    stack = full_stack
    stack.env["ATELIER_GENERATION_MAX_ATTEMPTS"] = "2"
    stack.start_api()
    stack.start_beat()
    stack.start_worker("worker-maintenance", queues="maintenance")
    first = stack.start_worker("worker-generate-1", queues="generate")
    for name in ("worker-maintenance", "worker-generate-1"):
        stack.wait_consuming(name)
    client = stack.client("acme")
    # Long enough on tiny-sd to still be denoising seconds after it started (tens of seconds here).
    body = {"base_model": "tiny-sd", "prompt": "a red square", "steps": 60, "num_images": 2, "seed": 5}
    generation_id = client.generate({**body, "width": 32, "height": 32})["id"]

    running = wait_for(
        "the generation to start",
        lambda: (gen := client.generation(generation_id))["status"] == "running" and gen,
        stack,
        timeout_s=120,
    )
    assert running["attempt"] == 1
    with session_scope(stack.database_url) as session:
        row = fresh_row(session, generation_id)
        tenant_id, holder = row.tenant_id, row.worker_id
    # The row names the pool process of worker 1 that runs it.
    assert holder in {f"{socket.gethostname()}:{pid}" for pid in child_pids(first.pid)}, holder
    time.sleep(2)  # into the denoising loop: loading tiny-sd takes a second or two
    assert client.generation(generation_id)["status"] == "running", "finished before the kill: make it longer"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()

    stack.start_worker("worker-generate-2", queues="generate")
    final = wait_for(
        "the generation to finish",
        lambda: (gen := client.generation(generation_id))["status"] in TERMINAL and gen,
        stack,
        timeout_s=240,
    )
    recovered_s = time.monotonic() - killed_at

    assert final["status"] == "succeeded", final["error"]
    assert (final["attempt"], final["error"]) == (2, None)
    assert len(final["images"]) == 2
    prefix = generation_prefix(tenant_id, generation_id)
    with session_scope(stack.database_url) as session:
        keys = fresh_row(session, generation_id).image_keys
    assert keys == [f"{prefix}/attempt-2/{index}.png" for index in range(2)]
    assert s3_objects(s3_server, stack, prefix) == keys  # stored once: nothing of the killed attempt
    # Finished exactly once: one attempt ended, the second, and the reaper is what re-queued it.
    logs = "\n".join(full_log(stack, name) for name in stack.processes)
    assert logs.count(f"generation {generation_id} attempt 2 ended: succeeded") == 1
    assert f"generation {generation_id} attempt 1 ended" not in logs
    assert f"requeued generations ['{generation_id}']" in full_log(stack, "worker-maintenance")
    print(f"killed mid-generation; succeeded on attempt 2 {recovered_s:.1f} s after the kill")
