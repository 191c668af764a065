"""keys and deletion: key names, expiry and last use; rows that outlive what they came from

A finished job keeps its row when its dataset is deleted, and an artifact keeps its row when its
job is deleted: the references become NULL. A generation records the images it stored from data
URIs, so deleting it deletes them too.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("dataset_id", existing_type=sa.String(length=40), nullable=True)
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=True)
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_image_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("input_image_ids")
    # Rows whose dataset or job was deleted cannot satisfy NOT NULL again: they go first.
    op.execute("DELETE FROM artifacts WHERE job_id IS NULL")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=40), nullable=False)
    op.execute(
        "DELETE FROM webhook_deliveries WHERE job_id IN (SELECT id FROM jobs WHERE dataset_id IS NULL)"
    )
    op.execute("DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE dataset_id IS NULL)")
    op.execute("DELETE FROM artifacts WHERE job_id IN (SELECT id FROM jobs WHERE dataset_id IS NULL)")
    op.execute("DELETE FROM jobs WHERE dataset_id IS NULL")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("dataset_id", existing_type=sa.String(length=40), nullable=False)
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("name")
