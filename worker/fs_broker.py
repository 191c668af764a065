"""The embedded broker: kombu's filesystem transport, with messages that appear whole or not at all.

kombu 5.7 writes a message by creating `<ms>_<uuid>.<queue>.msg` and then writing its body. A
consumer polling between the two moves the still-empty file away, fails to decode it and deletes
it: the message is lost, and a generation so lost stayed queued until a CI test gave up. Measured
with two processes, one putting 20,000 messages and one polling: 132 lost. Here the body is written
under a name no consumer matches and then renamed into place; a rename within one folder is atomic,
so a consumer sees the whole file or nothing (tests/test_fs_broker.py polls mid-write, on both).

Selected by `make_celery` for `filesystem://` URLs; the Redis broker of production is unaffected.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

TRANSPORT = "worker.fs_broker:Transport"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The name kombu gives (consumers take files in name order; CLOCK_MONOTONIC is system-wide).
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        # "partial-<uuid>" has no ".<queue>.msg" after its first dot: no consumer takes it.
        partial = os.path.join(self.data_folder_out, f"partial-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
