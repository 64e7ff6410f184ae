"""Answer timings (the admins' median time to first text) and settings stored from the Home tab.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "answer_timings",
        sa.Column("question_id", sa.Integer(), nullable=False),
        sa.Column("first_text_ms", sa.Integer(), nullable=False),
        sa.Column("answer_ms", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["question_id"], ["messages.id"], name=op.f("fk_answer_timings_question_id_messages"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("question_id", name=op.f("pk_answer_timings")),
    )
    with op.batch_alter_table("answer_timings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_answer_timings_created_at"), ["created_at"], unique=False)
    op.create_table(
        "stored_settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_stored_settings")),
    )


def downgrade() -> None:
    op.drop_table("stored_settings")
    with op.batch_alter_table("answer_timings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_answer_timings_created_at"))
    op.drop_table("answer_timings")
