"""generation lease: generations get the jobs' guarantees (cancel flag, bounded attempts, a lease
renewed by the worker's heartbeat, the worker's id), so the reaper can take back one whose worker died

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        # Server defaults fill the rows already there; the application sets both on every insert.
        batch_op.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3"))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("worker_id", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_generations_status_lease", ["status", "lease_expires_at"], unique=False)
    # A generation running before leases existed is held by nothing that can renew one: most are
    # stuck for good (their worker died). An expired lease lets the reaper re-queue them.
    op.execute(
        "UPDATE generations SET lease_expires_at = COALESCE(started_at, created_at) WHERE status = 'running'"
    )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_status_lease")
        batch_op.drop_column("worker_id")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("max_attempts")
        batch_op.drop_column("cancel_requested")
