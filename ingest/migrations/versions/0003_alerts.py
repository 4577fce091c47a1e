"""Rules and alerts: users, alerts, transitions, the notification outbox and attempts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Rule versions are kept as config kinds "rule:<id>": room for a 64-character rule id.
    with op.batch_alter_table("config_versions") as batch:
        batch.alter_column("kind", type_=sa.String(length=100), existing_type=sa.String(length=32))
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(length=64), primary_key=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("store_id", sa.String(length=64), sa.ForeignKey("stores.store_id"), nullable=True),
        sa.Column("region_id", sa.String(length=64), sa.ForeignKey("regions.region_id"), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=True, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("disabled_at", TS, nullable=True),
    )
    op.create_table(
        "alerts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("dedup_key", sa.String(length=300), nullable=False, unique=True),
        sa.Column("rule_id", sa.String(length=64), nullable=False),
        sa.Column("rule_version", sa.Integer(), nullable=False),
        sa.Column("rule_type", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("store_id", sa.String(length=64), nullable=False),
        sa.Column("region_id", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=True),
        sa.Column("window_start", sa.Date(), nullable=False),
        sa.Column("window_end", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("summary", JSON, nullable=False),
        sa.Column("values", JSON, nullable=False),
        sa.Column("evidence", JSON, nullable=False),
        sa.Column("raised_at", TS, nullable=False),
        sa.Column("acknowledged_at", TS, nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=True),
        sa.Column("resolved_at", TS, nullable=True),
        sa.Column("resolved_by", sa.String(length=64), nullable=True),
        sa.Column("escalated_at", TS, nullable=True),
    )
    op.create_index("ix_alerts_store_raised", "alerts", ["store_id", "raised_at"])
    op.create_index("ix_alerts_region_raised", "alerts", ["region_id", "raised_at"])
    op.create_index("ix_alerts_rule_store_status", "alerts", ["rule_id", "store_id", "status"])
    op.create_table(
        "alert_transitions",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("alert_id", BIGID, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_index("ix_alert_transitions_alert_id", "alert_transitions", ["alert_id"])
    op.create_table(
        "notifications",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("alert_id", BIGID, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        sa.Column("claimed_at", TS, nullable=True),
        sa.Column("sent_at", TS, nullable=True),
        sa.Column("digest_id", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("alert_id", "channel_id", "reason", name="uq_notifications_alert_channel_reason"),
    )
    op.create_index("ix_notifications_alert_id", "notifications", ["alert_id"])
    op.create_index("ix_notifications_due", "notifications", ["status", "next_attempt_at"])
    op.create_table(
        "notification_attempts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("channel_id", sa.String(length=64), nullable=False),
        sa.Column("notification_ids", JSON, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=100), nullable=False),
    )
    op.create_index("ix_notification_attempts_channel_at", "notification_attempts", ["channel_id", "at"])


def downgrade() -> None:
    op.drop_table("notification_attempts")
    op.drop_table("notifications")
    op.drop_table("alert_transitions")
    op.drop_table("alerts")
    op.drop_table("users")
    with op.batch_alter_table("config_versions") as batch:
        batch.alter_column("kind", type_=sa.String(length=32), existing_type=sa.String(length=100))
