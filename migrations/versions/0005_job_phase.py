"""job phase: which phase a running job is in and how far it is (done of total, in the phase's units)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phase", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("phase_done", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("phase_total", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("phase_total")
        batch_op.drop_column("phase_done")
        batch_op.drop_column("phase")
