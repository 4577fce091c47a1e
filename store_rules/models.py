"""Tables of the rule side: versioned definitions and compliance violations.

They share the event store's metadata, so one Alembic history (ingest/migrations) covers
the whole schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ingest.models import Base
from ingest.types import JsonDoc, UtcDateTime


class ConfigVersion(Base):
    __tablename__ = "config_versions"
    kind: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    checksum: Mapped[str] = mapped_column(String(64))
    content: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    source: Mapped[str] = mapped_column(Text)
    loaded_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ComplianceViolation(Base):
    """A flow-controlled sale whose consultation was missing or incomplete when it arrived."""

    __tablename__ = "compliance_violations"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    store_id: Mapped[str] = mapped_column(String(64))
    receipt_event_id: Mapped[str] = mapped_column(String(64))
    receipt_id: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    staff_id: Mapped[str | None] = mapped_column(String(64))
    consultation_id: Mapped[str | None] = mapped_column(String(64))
    skus: Mapped[list[str]] = mapped_column(JsonDoc)
    missing_steps: Mapped[list[str]] = mapped_column(JsonDoc)
    out_of_order: Mapped[list[str]] = mapped_column(JsonDoc)
    flow_version: Mapped[int] = mapped_column(Integer)
    detected_at: Mapped[datetime] = mapped_column(UtcDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (
        UniqueConstraint("receipt_event_id", name="uq_compliance_violations_receipt"),
        Index("ix_compliance_violations_store_time", "store_id", "occurred_at"),
        Index("ix_compliance_violations_consultation", "consultation_id"),
    )
