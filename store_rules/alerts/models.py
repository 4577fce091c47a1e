"""Tables of the alert side: alerts, their transitions, the notification outbox and its attempts.

They share the event store's metadata, so one Alembic history (ingest/migrations) covers them.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import BigInteger, Date, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ingest.models import Base
from ingest.types import JsonDoc, UtcDateTime

BigId = BigInteger().with_variant(Integer, "sqlite")

OPEN, ACKNOWLEDGED, RESOLVED = "open", "acknowledged", "resolved"
PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"


class Alert(Base):
    """One raised alert. `dedup_key` (rule, store, window) makes raising idempotent."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(300), unique=True)
    rule_id: Mapped[str] = mapped_column(String(64))
    rule_version: Mapped[int] = mapped_column(Integer)
    rule_type: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    store_id: Mapped[str] = mapped_column(String(64))
    region_id: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(64))  # e.g. the silent sensor
    window_start: Mapped[date] = mapped_column(Date)
    window_end: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), default=OPEN)
    level: Mapped[str] = mapped_column(String(16))  # who it is routed to now: store / region / headquarters
    role: Mapped[str] = mapped_column(String(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # {"zh-CN": ..., "en": ...}
    values: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # the metric values that fired it
    evidence: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc)  # unmasked; masked whenever it leaves
    raised_at: Mapped[datetime] = mapped_column(UtcDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    resolved_by: Mapped[str | None] = mapped_column(String(64))
    escalated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (
        Index("ix_alerts_store_raised", "store_id", "raised_at"),
        Index("ix_alerts_region_raised", "region_id", "raised_at"),
        Index("ix_alerts_rule_store_status", "rule_id", "store_id", "status"),
    )


class AlertTransition(Base):
    """Every change of an alert (raised, acknowledged, escalated, resolved), never updated."""

    __tablename__ = "alert_transitions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    action: Mapped[str] = mapped_column(String(16))  # raised / acknowledged / escalated / resolved
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(64))  # a user id, or "system"
    note: Mapped[str | None] = mapped_column(Text)


class Notification(Base):
    """The outbox: one row per alert, channel and reason; a worker claims it before sending."""

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16))  # raised / escalated
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    digest_id: Mapped[str | None] = mapped_column(String(64))  # set when sent merged with others
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    __table_args__ = (
        UniqueConstraint("alert_id", "channel_id", "reason", name="uq_notifications_alert_channel_reason"),
        Index("ix_notifications_due", "status", "next_attempt_at"),
    )


class NotificationAttempt(Base):
    """Every delivery attempt with its outcome; a digest attempt lists all the notifications it carried."""

    __tablename__ = "notification_attempts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    notification_ids: Mapped[list[int]] = mapped_column(JsonDoc)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    ok: Mapped[bool] = mapped_column()
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(100))
    __table_args__ = (Index("ix_notification_attempts_channel_at", "channel_id", "at"),)
