"""Numbers that stay true: a generation on each dirty mark, revised closed days, replayable dead
letters, and when each counter was registered.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Each mark of a store-day bumps its generation; a refresh clears only the generation it read.
    with op.batch_alter_table("rollup_dirty") as batch:
        batch.add_column(sa.Column("generation", sa.BigInteger(), nullable=False, server_default="1"))
    with op.batch_alter_table("rollup_store_day") as batch:
        batch.add_column(sa.Column("revised_at", TS, nullable=True))
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("replayed_at", TS, nullable=True))
        batch.add_column(sa.Column("replay_status", sa.String(length=20), nullable=True))
        batch.add_column(sa.Column("replay_note", sa.Text(), nullable=True))
    with op.batch_alter_table("sensors") as batch:
        batch.add_column(sa.Column("registered_at", TS, nullable=True))
    # Counters that exist before this migration count as registered now: their grace period starts today.
    op.execute(sa.text("UPDATE sensors SET registered_at = CURRENT_TIMESTAMP WHERE registered_at IS NULL"))


def downgrade() -> None:
    with op.batch_alter_table("sensors") as batch:
        batch.drop_column("registered_at")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("replay_note")
        batch.drop_column("replay_status")
        batch.drop_column("replayed_at")
    with op.batch_alter_table("rollup_store_day") as batch:
        batch.drop_column("revised_at")
    with op.batch_alter_table("rollup_dirty") as batch:
        batch.drop_column("generation")
