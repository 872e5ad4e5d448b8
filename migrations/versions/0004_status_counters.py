"""job result counter and an index of retried requests, so that status reads no whole job

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

RETRIED = sa.text("attempts > 1")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_count", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET result_count = (SELECT count(*) FROM results WHERE results.job_id = jobs.id)")
    # partial: it holds only the few requests started more than once
    op.create_index("ix_requests_retried", "requests", ["job_id"], postgresql_where=RETRIED, sqlite_where=RETRIED)


def downgrade() -> None:
    op.drop_index("ix_requests_retried", table_name="requests")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("result_count")
