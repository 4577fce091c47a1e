"""Stock master data, promotions, their audit, published sets and till acknowledgements.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
QTY = sa.Numeric(14, 3)
OPEN = "status IN ('pending', 'active')"


def upgrade() -> None:
    op.create_table(
        "safety_stock",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("sku", sa.String(length=64), primary_key=True),
        sa.Column("safety_stock", QTY, nullable=False),
        sa.Column("lead_time_days", sa.Integer(), nullable=False),
    )
    op.create_table(
        "promotion_acks",
        sa.Column("store_id", sa.String(length=64), primary_key=True),
        sa.Column("terminal_id", sa.String(length=64), primary_key=True),
        sa.Column("promotions_version", sa.Integer(), primary_key=True),
        sa.Column("acked_at", TS, nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
    )
    op.create_table(
        "promotions",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("promotion_id", sa.String(length=64), nullable=False, unique=True),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("region_id", sa.String(length=64), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("eligible_skus", JSON, nullable=False),
        sa.Column("template_id", sa.String(length=64), nullable=False),
        sa.Column("template_version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("limit_units", QTY, nullable=True),
        sa.Column("title", JSON, nullable=False),
        sa.Column("till_text", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rule_id", sa.String(length=64), nullable=True),
        sa.Column("alert_id", BIGID, sa.ForeignKey("alerts.id", ondelete="SET NULL"), nullable=True),
        sa.Column("evidence", JSON, nullable=False),
        sa.Column("duration_days", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("decide_by", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("starts_at", TS, nullable=True),
        sa.Column("ends_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
    )
    op.create_index(
        "uq_promotions_open_store_sku_template", "promotions", ["store_id", "sku", "template_id"], unique=True,
        postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN),
    )  # fmt: skip
    op.create_index("ix_promotions_store_status", "promotions", ["store_id", "status"])
    op.create_index("ix_promotions_status_decide_by", "promotions", ["status", "decide_by"])
    op.create_table(
        "promotion_audit",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("promotion_pk", BIGID, sa.ForeignKey("promotions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("detail", JSON, nullable=False),
    )
    op.create_index("ix_promotion_audit_promotion_pk", "promotion_audit", ["promotion_pk"])
    op.create_table(
        "promotion_sets",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content", JSON, nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("published_at", TS, nullable=True),
        sa.UniqueConstraint("store_id", "version", name="uq_promotion_sets_store_version"),
    )
    op.create_index("ix_promotion_sets_unpublished", "promotion_sets", ["published_at"])


def downgrade() -> None:
    op.drop_table("promotion_sets")
    op.drop_table("promotion_audit")
    op.drop_table("promotions")
    op.drop_table("promotion_acks")
    op.drop_table("safety_stock")
