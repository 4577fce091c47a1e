"""Tables of the promotion side: promotions, their audit trail and the published sets.

They share the event store's metadata, so one Alembic history (ingest/migrations) covers them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

import store_rules.alerts.models  # noqa: F401  (the alerts table a draft's alert_id points to)
from ingest.models import Base
from ingest.types import JsonDoc, Quantity, UtcDateTime

BigId = BigInteger().with_variant(Integer, "sqlite")

PENDING, ACTIVE, REJECTED, EXPIRED, ENDED, RETRACTED = "pending", "active", "rejected", "expired", "ended", "retracted"
OPEN_STATUSES = (PENDING, ACTIVE)
_OPEN_SQL = "status IN ('pending', 'active')"


class Promotion(Base):
    """One promotion of one store: drafted by a rule (or a person), decided by the store's manager."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    promotion_id: Mapped[str] = mapped_column(String(64), unique=True)
    store_id: Mapped[str] = mapped_column(String(64))
    region_id: Mapped[str] = mapped_column(String(64))
    sku: Mapped[str] = mapped_column(String(64))  # the SKU the draft is about (dedup key with store and template)
    eligible_skus: Mapped[list[str]] = mapped_column(JsonDoc)
    template_id: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    limit_units: Mapped[Decimal | None] = mapped_column(Quantity)  # e.g. the quantity at risk of expiry
    title: Mapped[dict[str, str]] = mapped_column(JsonDoc)
    till_text: Mapped[dict[str, str]] = mapped_column(JsonDoc)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    rule_id: Mapped[str | None] = mapped_column(String(64))
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="SET NULL"))
    evidence: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    duration_days: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    decide_by: Mapped[datetime] = mapped_column(UtcDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)  # why it was rejected or retracted
    starts_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ends_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # when it left the tills (end, retraction)
    __table_args__ = (
        # Never a second draft for the same store × SKU × template while one is pending or active,
        # even when two evaluations race.
        Index(
            "uq_promotions_open_store_sku_template", "store_id", "sku", "template_id", unique=True,
            postgresql_where=text(_OPEN_SQL), sqlite_where=text(_OPEN_SQL),
        ),
        Index("ix_promotions_store_status", "store_id", "status"),
        Index("ix_promotions_status_decide_by", "status", "decide_by"),
    )  # fmt: skip


class PromotionAudit(Base):
    """Every decision and change of a promotion, never updated."""

    __tablename__ = "promotion_audit"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    promotion_pk: Mapped[int] = mapped_column(ForeignKey("promotions.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    action: Mapped[str] = mapped_column(String(16))  # drafted / approved / rejected / expired / retracted / ended
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(64))  # a user id, or "system"
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # e.g. the parameters before and after an edit


class PromotionSet(Base):
    """One version of a store's active promotions, as published (retained) to its tills."""

    __tablename__ = "promotion_sets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    store_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    content: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    reason: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (
        UniqueConstraint("store_id", "version", name="uq_promotion_sets_store_version"),
        Index("ix_promotion_sets_unpublished", "published_at"),
    )
