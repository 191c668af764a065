# Built-in base models (owned with core/bases/loader.py): one cache folder per machine, reused across
# runs, so tiny-sd / tiny-sdxl are built once (about 100 s each), not per test or per run.
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

# S3 test fixtures (owned with tests/s3_server.py): pytest finds fixtures by name in conftest, so
# importing them here makes one session-wide S3 server and `s3_settings` visible to every test.
from tests.s3_server import s3_server, s3_settings  # noqa: F401

# Real processes against real services (owned with tests/service_stack.py).
from tests.service_stack import embedded_stack, full_stack, postgres_url, redis_url  # noqa: F401


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the run as Ctrl-C does. By default SIGTERM kills pytest outright, so no
    fixture teardown runs and the processes fixtures started in sessions of their own (the S3
    server, API and worker processes) are left behind; a KeyboardInterrupt unwinds through every
    fixture's teardown instead."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def model_cache() -> Iterator[Path]:
    from core.config import reset_settings

    folder = Path(os.environ.get("ATELIER_TEST_MODEL_CACHE", "/tmp/atelier-test-models"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_MODEL_CACHE", str(folder))
        reset_settings()
        yield folder
    reset_settings()


@pytest.fixture(scope="session")
def tiny_sd(model_cache: Path):
    """Settings under which `load_base("tiny-sd", settings=...)` uses the shared cache."""
    from core.config import Settings

    return Settings(model_cache=model_cache)


pytest_plugins = ["tests.db_fixtures", "tests.webhook_fixtures"]
