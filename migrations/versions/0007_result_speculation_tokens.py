"""per-result tokens speculative decoding proposed and kept

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("draft_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("accepted_draft_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("accepted_draft_tokens")
        batch_op.drop_column("draft_tokens")
