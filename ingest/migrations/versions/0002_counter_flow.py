"""Counter flow: versioned flow / prompt definitions and compliance violations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "config_versions",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("content", JSON, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "version"),
    )
    op.create_table(
        "compliance_violations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_event_id", sa.String(length=64), nullable=False),
        sa.Column("receipt_id", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("staff_id", sa.String(length=64), nullable=True),
        sa.Column("consultation_id", sa.String(length=64), nullable=True),
        sa.Column("skus", JSON, nullable=False),
        sa.Column("missing_steps", JSON, nullable=False),
        sa.Column("out_of_order", JSON, nullable=False),
        sa.Column("flow_version", sa.Integer(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("receipt_event_id", name="uq_compliance_violations_receipt"),
    )
    op.create_index("ix_compliance_violations_store_time", "compliance_violations", ["store_id", "occurred_at"])
    op.create_index("ix_compliance_violations_consultation", "compliance_violations", ["consultation_id"])


def downgrade() -> None:
    op.drop_table("compliance_violations")
    op.drop_table("config_versions")
