"""Rollups: per store and business day, per store and hour, per store × SKU × day, and the store-days to recompute.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(14, 2)
RATIOS = ("conversion_rate", "step_completeness", "symptom_completeness", "insurance_pass_rate", "traceability")


def upgrade() -> None:
    op.create_table(
        "rollup_dirty",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("marked_at", TS, nullable=False),
    )
    op.create_table(
        "rollup_store_day",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("sales", MONEY, nullable=False),
        sa.Column("transactions", sa.Integer(), nullable=False),
        sa.Column("returns", sa.Integer(), nullable=False),
        sa.Column("visitors", sa.Integer(), nullable=False),
        *[sa.Column(f"{name}_{part}", sa.Integer(), nullable=False) for name in RATIOS for part in ("num", "den")],
        sa.Column("computed_at", TS, nullable=False),
    )
    op.create_index("ix_rollup_store_day_day", "rollup_store_day", ["day"])
    op.create_table(
        "rollup_store_hour",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("hour_start", TS, primary_key=True),
        sa.Column("sales", MONEY, nullable=False),
        sa.Column("transactions", sa.Integer(), nullable=False),
        sa.Column("returns", sa.Integer(), nullable=False),
        sa.Column("visitors", sa.Integer(), nullable=False),
    )
    op.create_table(
        "rollup_store_sku_day",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("sku", sa.String(length=64), primary_key=True),
        sa.Column("units", sa.Numeric(14, 3), nullable=False),
        sa.Column("sales", MONEY, nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("promo_lines", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollup_store_sku_day")
    op.drop_table("rollup_store_hour")
    op.drop_table("rollup_store_day")
    op.drop_table("rollup_dirty")
