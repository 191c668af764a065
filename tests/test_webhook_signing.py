"""Webhook signatures: Standard Webhooks signing, checked by an independent verifier, and the
rotation of a tenant's signing secret. Database tests run on SQLite and PostgreSQL (`db_url`).
"""

from __future__ import annotations

import base64
import time
from datetime import timedelta

from core.config import Settings
from core.db import new_session, session_scope
from core.timeutil import utcnow
from core.webhooks import events as webhooks
from tests.webhook_fixtures import new_job, tenant_secret, verify


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The specification's published vector: any Standard Webhooks library verifies our deliveries.
    signature = webhooks.sign(
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_independent_verifier_accepts_every_live_secret_and_nothing_else() -> None:
    current, previous, stranger = (webhooks.new_secret() for _ in range(3))
    assert current.startswith("whsec_") and len(base64.b64decode(current[6:])) == 32
    body = b'{"type":"job.succeeded"}'
    headers = webhooks.signed_headers(
        msg_id="msg_1", timestamp=int(time.time()), body=body, secrets=[current, previous]
    )
    assert verify(current, headers, body) and verify(previous, headers, body)
    assert not verify(stranger, headers, body)
    assert not verify(current, headers, body + b" ")
    assert not verify(current, {**headers, "webhook-id": "msg_2"}, body)
    assert not verify(current, headers, body, now=int(time.time()) + 3600)  # a replayed old delivery


def test_a_rotated_secret_keeps_signing_until_its_grace_ends(hook_settings: Settings) -> None:
    tenant_id, _ = new_job(hook_settings, None)
    old = tenant_secret(hook_settings, tenant_id)
    with session_scope(hook_settings.database_url) as session:
        new = webhooks.rotate_secret(session=session, tenant_id=tenant_id, grace_s=3600).secret
    assert new != old
    with new_session(hook_settings.database_url) as session:
        assert webhooks.signing_secrets(session=session, tenant_id=tenant_id) == [new, old]
        later = utcnow() + timedelta(seconds=3601)
        assert webhooks.signing_secrets(session=session, tenant_id=tenant_id, now=later) == [new]
