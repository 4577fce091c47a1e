"""Receipts as tills send them (net sales, discounts, tax, tenders, source), source id mappings,
the database pull's watermarks and the drop folder's files.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(14, 2)
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("receipts") as batch:
        batch.add_column(sa.Column("net_total", MONEY, nullable=True))
        batch.add_column(sa.Column("discount_total", MONEY, nullable=False, server_default="0"))
        batch.add_column(sa.Column("tax_total", MONEY, nullable=True))
        batch.add_column(sa.Column("prices_include_tax", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("tenders", JSON_DOC, nullable=True))
        batch.add_column(sa.Column("source_name", sa.String(length=64), nullable=True))
    # Before this revision a receipt had no discounts: its net sales are its total.
    op.execute(sa.text("UPDATE receipts SET net_total = total WHERE net_total IS NULL"))
    with op.batch_alter_table("receipt_lines") as batch:
        batch.add_column(sa.Column("discount", MONEY, nullable=False, server_default="0"))
    op.create_table(
        "source_mappings",
        sa.Column("kind", sa.String(length=16), primary_key=True),
        sa.Column("source", sa.String(length=64), primary_key=True),
        sa.Column("external_id", sa.String(length=64), primary_key=True),
        sa.Column("target_id", sa.String(length=64), nullable=False),
        sa.CheckConstraint("kind IN ('store', 'sku', 'staff')", name="ck_source_mappings_kind"),
    )
    op.create_table(
        "import_watermarks",
        sa.Column("profile", sa.String(length=100), primary_key=True),
        sa.Column("watermark", sa.Text(), nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("rows_total", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "import_files",
        sa.Column("sha256", sa.String(length=64), primary_key=True),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("adapter", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("report", JSON_DOC, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("import_files")
    op.drop_table("import_watermarks")
    op.drop_table("source_mappings")
    with op.batch_alter_table("receipt_lines") as batch:
        batch.drop_column("discount")
    with op.batch_alter_table("receipts") as batch:
        for column in ("source_name", "tenders", "prices_include_tax", "tax_total", "discount_total", "net_total"):
            batch.drop_column(column)
