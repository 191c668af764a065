"""Whole generation attempts in-process on tiny-sd (core/generation/inference.py): an attempt stores
under its own prefix and removes what a dead one left, stores nothing once it lost its lease while
denoising, discards what it stored when fenced out while storing, and stops between steps when
canceled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from core.config import Settings
from core.db import session_scope
from core.generation import inference
from core.generation import states as generation_states
from core.generation.images import attempt_prefix
from core.storage.base import Storage
from core.storage.factory import make_storage
from tests import generation_fixtures
from tests.generation_fixtures import (
    claim_now,
    expire_lease,
    fresh_row,
    queued_generation,
    stored_keys,
    take_over,
)

# A fixture is found by its name in the test's module.
gen_settings = generation_fixtures.gen_settings


def test_an_attempt_removes_what_a_dead_attempt_left_and_stores_under_its_own_prefix(
    gen_settings: Settings,
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = queued_generation(gen_settings)
    with session_scope(gen_settings.database_url) as session:
        claim_now(session, generation_id, worker_id="dead:1")
    # Attempt 1 was killed while storing its images: one of two made it.
    storage.put_bytes(
        f"{attempt_prefix(tenant_id, generation_id, 1)}/0.png", b"half", content_type="image/png"
    )
    with session_scope(gen_settings.database_url) as session:
        expire_lease(session, generation_id)
        assert generation_states.reap_stale(session=session) == [generation_id]

    status = inference.run_generation(
        generation_id=generation_id, settings=gen_settings, storage=storage, worker_id="live:2"
    )

    assert status == "succeeded"
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.attempt, row.worker_id, row.error_code) == (2, "live:2", None)
        keys = row.image_keys
    second = attempt_prefix(tenant_id, generation_id, 2)
    assert keys == [f"{second}/0.png", f"{second}/1.png"]
    assert stored_keys(storage, tenant_id, generation_id) == keys
    assert storage.get_bytes(keys[0]).startswith(b"\x89PNG")


def test_an_attempt_that_loses_its_lease_while_denoising_stores_nothing(
    gen_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = queued_generation(gen_settings, steps=40)
    real = inference.generate_images
    steps: list[int] = []

    def stalled_then_reaped(*, on_step: Callable[[], None], **kwargs: Any) -> list[Any]:
        take_over(gen_settings, generation_id)

        def step() -> None:
            steps.append(1)
            time.sleep(0.05)  # bounds the steps run before the next heartbeat learns the news
            on_step()

        return real(on_step=step, **kwargs)

    monkeypatch.setattr(inference, "generate_images", stalled_then_reaped)
    assert (
        inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage) is None
    )

    assert 0 < len(steps) < 40, "the attempt ran to the end of its steps, past the lost lease"
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.attempt, row.worker_id, row.image_keys) == ("running", 2, "other:2", None)
    assert stored_keys(storage, tenant_id, generation_id) == []


class _TakeoverWhileStoring:
    """The storage, with the lease taken away right after the attempt's first image is stored."""

    def __init__(self, storage: Storage, take_over: Callable[[], None]) -> None:
        self._storage, self._take_over, self.puts = storage, take_over, 0

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        self._storage.put_bytes(key, data, content_type=content_type)
        self.puts += 1
        if self.puts == 1:
            self._take_over()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def test_an_attempt_fenced_out_while_storing_discards_what_it_stored(gen_settings: Settings) -> None:
    tenant_id, generation_id = queued_generation(gen_settings)
    storage = _TakeoverWhileStoring(
        make_storage(gen_settings), lambda: take_over(gen_settings, generation_id)
    )

    status = inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage)  # type: ignore[arg-type]

    assert status is None
    assert storage.puts == 2  # both images were stored, then the fenced finish refused them
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.attempt, row.image_keys) == ("running", 2, None)
    assert stored_keys(storage, tenant_id, generation_id) == []  # type: ignore[arg-type]


def test_cancel_stops_a_running_generation_between_steps(
    gen_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage(gen_settings)
    tenant_id, generation_id = queued_generation(gen_settings, steps=100)
    real = inference.generate_images
    steps: list[int] = []

    def canceled_meanwhile(*, on_step: Callable[[], None], **kwargs: Any) -> list[Any]:
        with session_scope(gen_settings.database_url) as session:
            generation_states.request_cancel(session=session, generation=fresh_row(session, generation_id))

        def step() -> None:
            steps.append(1)
            time.sleep(0.05)
            on_step()

        return real(on_step=step, **kwargs)

    monkeypatch.setattr(inference, "generate_images", canceled_meanwhile)
    assert inference.run_generation(generation_id=generation_id, settings=gen_settings, storage=storage) == (
        "canceled"
    )

    assert 0 < len(steps) < 100
    with session_scope(gen_settings.database_url) as session:
        row = fresh_row(session, generation_id)
        assert (row.status, row.cancel_requested, row.image_keys, row.error_code) == (
            "canceled",
            True,
            None,
            None,
        )
        assert row.finished_at is not None and row.lease_expires_at is None
    assert stored_keys(storage, tenant_id, generation_id) == []
