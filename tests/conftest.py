# S3 test fixtures (owned with tests/s3_server.py): pytest finds fixtures by name in conftest, so
# importing them here makes one session-wide S3 server and `s3_settings` visible to every test.
from tests.s3_server import s3_server, s3_settings  # noqa: F401

# Real processes against real services (owned with tests/service_stack.py).
from tests.service_stack import embedded_stack, full_stack, postgres_url, redis_url  # noqa: F401

pytest_plugins = ["tests.db_fixtures"]
