"""Schema of the event store: master data, events (hypertables on TimescaleDB) and dead letters.

Every event table is keyed on (event_id, occurred_at): TimescaleDB requires the partitioning
column in every unique index, and the pair makes a redelivered event a no-op.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ingest.types import JsonDoc, Money, Quantity, UtcDateTime


class Base(DeclarativeBase):
    pass


# --- master data -------------------------------------------------------------------------


class Region(Base):
    __tablename__ = "regions"
    region_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(100))


class Store(Base):
    __tablename__ = "stores"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    region_id: Mapped[str] = mapped_column(ForeignKey("regions.region_id"), index=True)
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(100))
    city: Mapped[str | None] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai")
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Terminal(Base):
    __tablename__ = "terminals"
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.store_id"), primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))


class Sensor(Base):
    __tablename__ = "sensors"
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.store_id"), primary_key=True)
    sensor_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))
    location: Mapped[str | None] = mapped_column(String(100))
    # When the counter was registered: a counter that never reported is judged from here, after a grace period.
    registered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))


class Sku(Base):
    __tablename__ = "skus"
    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(64), index=True)
    atc_code: Mapped[str | None] = mapped_column(String(16))
    unit_price: Mapped[Decimal | None] = mapped_column(Money)
    is_rx: Mapped[bool] = mapped_column(Boolean, default=False)
    flow_controlled: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_triggering: Mapped[bool] = mapped_column(Boolean, default=False)
    insurance_eligible: Mapped[bool] = mapped_column(Boolean, default=False)


class Staff(Base):
    __tablename__ = "staff"
    staff_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.store_id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(64))


class Member(Base):
    __tablename__ = "members"
    member_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    home_store_id: Mapped[str | None] = mapped_column(ForeignKey("stores.store_id"))
    phone_last4: Mapped[str | None] = mapped_column(String(4))


class DeviceToken(Base):
    __tablename__ = "device_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    store_id: Mapped[str] = mapped_column(ForeignKey("stores.store_id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class User(Base):
    """A person: store staff, a store manager, a region supervisor, headquarters or an admin.

    The scope follows the role: staff and managers belong to a store, supervisors to a region,
    headquarters and admins to the chain. People use the API with a personal token (only a
    SHA-256 of it is stored, like device tokens).
    """

    __tablename__ = "users"
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(32))
    store_id: Mapped[str | None] = mapped_column(ForeignKey("stores.store_id"))
    region_id: Mapped[str | None] = mapped_column(ForeignKey("regions.region_id"))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Pages: an argon2id hash of the password, and the lockout after repeated failures.
    password_hash: Mapped[str | None] = mapped_column(String(200))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_login_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebSession(Base):
    """A signed-in browser. Only a SHA-256 of the cookie value is stored; a login always makes a new one."""

    __tablename__ = "web_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AuditEntry(Base):
    """Who did what, when: logins, approvals, acknowledgements, rule changes. Never updated."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # a user id, "system", or the name tried at a failed login
    action: Mapped[str] = mapped_column(String(64))  # login / login_failed / login_locked / logout / ...
    target: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    ip: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (Index("ix_audit_log_actor_at", "actor", "at"),)


# --- events ------------------------------------------------------------------------------


class Receipt(Base):
    __tablename__ = "receipts"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    terminal_id: Mapped[str] = mapped_column(String(64))
    receipt_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    staff_id: Mapped[str | None] = mapped_column(String(64))
    member_id: Mapped[str | None] = mapped_column(String(64))
    consultation_id: Mapped[str | None] = mapped_column(String(64))
    total: Mapped[Decimal] = mapped_column(Money)
    line_count: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    raw: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    # Σ line amounts − line discounts − receipt discounts, as priced (tax in or not: prices_include_tax).
    net_total: Mapped[Decimal | None] = mapped_column(Money)
    discount_total: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")
    tax_total: Mapped[Decimal | None] = mapped_column(Money)
    prices_include_tax: Mapped[bool | None] = mapped_column(Boolean)  # None: the chain setting
    tenders: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)
    source_name: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (
        Index("ix_receipts_store_time", "store_id", "occurred_at"),
        Index("ix_receipts_store_receipt", "store_id", "receipt_id"),
        Index("ix_receipts_consultation", "consultation_id"),
    )


class ReceiptLine(Base):
    __tablename__ = "receipt_lines"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    receipt_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    sku: Mapped[str] = mapped_column(String(64))
    qty: Mapped[Decimal] = mapped_column(Quantity)
    unit_price: Mapped[Decimal] = mapped_column(Money)
    amount: Mapped[Decimal] = mapped_column(Money)
    promotion_id: Mapped[str | None] = mapped_column(String(64))
    discount: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")
    __table_args__ = (
        Index("ix_receipt_lines_store_time", "store_id", "occurred_at"),
        Index("ix_receipt_lines_store_sku_time", "store_id", "sku", "occurred_at"),
    )


class ConsultationStep(Base):
    __tablename__ = "consultation_steps"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    terminal_id: Mapped[str] = mapped_column(String(64))
    consultation_id: Mapped[str] = mapped_column(String(64))
    staff_id: Mapped[str | None] = mapped_column(String(64))
    member_id: Mapped[str | None] = mapped_column(String(64))
    customer_name: Mapped[str | None] = mapped_column(String(100))
    step: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    skip_reason: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    raw: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    __table_args__ = (
        Index("ix_consultation_steps_store_time", "store_id", "occurred_at"),
        Index("ix_consultation_steps_consultation", "consultation_id", "occurred_at"),
    )


class PromptAnswer(Base):
    __tablename__ = "prompt_answers"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    terminal_id: Mapped[str] = mapped_column(String(64))
    receipt_id: Mapped[str] = mapped_column(String(64))
    sku: Mapped[str] = mapped_column(String(64))
    prompt_id: Mapped[str] = mapped_column(String(64))
    answer: Mapped[str] = mapped_column(String(200))
    staff_id: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    raw: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    __table_args__ = (Index("ix_prompt_answers_store_time", "store_id", "occurred_at"),)


class Footfall(Base):
    __tablename__ = "footfall"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    sensor_id: Mapped[str] = mapped_column(String(64))
    period_seconds: Mapped[int] = mapped_column(Integer)
    count_in: Mapped[int] = mapped_column(Integer)
    count_out: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    raw: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    __table_args__ = (Index("ix_footfall_store_time", "store_id", "occurred_at"),)


class StockSnapshot(Base):
    __tablename__ = "stock_snapshots"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    sku: Mapped[str] = mapped_column(String(64))
    on_hand: Mapped[Decimal] = mapped_column(Quantity)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    raw: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    __table_args__ = (Index("ix_stock_snapshots_store_sku_time", "store_id", "sku", "occurred_at"),)


class StockLot(Base):
    __tablename__ = "stock_lots"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    lot: Mapped[str] = mapped_column(String(64), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    sku: Mapped[str] = mapped_column(String(64))
    qty: Mapped[Decimal] = mapped_column(Quantity)
    expires_on: Mapped[date] = mapped_column(Date)
    __table_args__ = (Index("ix_stock_lots_store_sku_time", "store_id", "sku", "occurred_at"),)


class SafetyStock(Base):
    """Safety stock and replenishment lead time per store × SKU; store_id "*" is the chain-wide default."""

    __tablename__ = "safety_stock"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    safety_stock: Mapped[Decimal] = mapped_column(Quantity)
    lead_time_days: Mapped[int] = mapped_column(Integer, default=7)


class PromotionAck(Base):
    """A till's acknowledgement that it applied a version of its store's promotion set.

    Written by the ingest worker (MQTT ack topic) and the HTTP ack route; a redelivered ack is a no-op.
    """

    __tablename__ = "promotion_acks"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    terminal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    promotions_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    acked_at: Mapped[datetime] = mapped_column(UtcDateTime)
    source: Mapped[str] = mapped_column(String(200))


class SourceMapping(Base):
    """A source's own id (POSLog store, item id or GTIN, operator) mapped onto a StorePulse id."""

    __tablename__ = "source_mappings"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # store / sku / staff
    source: Mapped[str] = mapped_column(String(64), primary_key=True)  # e.g. poslog, or * for any source
    external_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target_id: Mapped[str] = mapped_column(String(64))
    __table_args__ = (CheckConstraint("kind IN ('store', 'sku', 'staff')", name="ck_source_mappings_kind"),)


class ImportWatermark(Base):
    """How far a database pull has got: saved only after the events up to it were accepted."""

    __tablename__ = "import_watermarks"
    profile: Mapped[str] = mapped_column(String(100), primary_key=True)
    watermark: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    rows_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class ImportFile(Base):
    """A file the drop folder has seen, by content: imported once, whatever its name or restarts."""

    __tablename__ = "import_files"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(500))
    adapter: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))  # importing / done / failed
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    report: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)


class RollupDirty(Base):
    """A store-day whose rollup must be recomputed: an event for it was accepted since."""

    __tablename__ = "rollup_dirty"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    marked_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Bumped by every mark; a refresh clears a mark only if nobody marked it again meanwhile.
    generation: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")


class RollupStoreDay(Base):
    """One store's business day: figures and each counter-flow ratio's numerator and denominator."""

    __tablename__ = "rollup_store_day"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    sales: Mapped[Decimal] = mapped_column(Money)
    transactions: Mapped[int] = mapped_column(Integer)
    returns: Mapped[int] = mapped_column(Integer)
    visitors: Mapped[int] = mapped_column(Integer)
    conversion_rate_num: Mapped[int] = mapped_column(Integer)
    conversion_rate_den: Mapped[int] = mapped_column(Integer)
    step_completeness_num: Mapped[int] = mapped_column(Integer)
    step_completeness_den: Mapped[int] = mapped_column(Integer)
    symptom_completeness_num: Mapped[int] = mapped_column(Integer)
    symptom_completeness_den: Mapped[int] = mapped_column(Integer)
    insurance_pass_rate_num: Mapped[int] = mapped_column(Integer)
    insurance_pass_rate_den: Mapped[int] = mapped_column(Integer)
    traceability_num: Mapped[int] = mapped_column(Integer)
    traceability_den: Mapped[int] = mapped_column(Integer)
    computed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set when a closed day's figures changed after they were first rolled up (late data).
    revised_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    __table_args__ = (Index("ix_rollup_store_day_day", "day"),)


class RollupStoreHour(Base):
    """Sales, transactions, returns and visitors of one store in one hour (UTC hour start), added to on ingest."""

    __tablename__ = "rollup_store_hour"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour_start: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    sales: Mapped[Decimal] = mapped_column(Money)
    transactions: Mapped[int] = mapped_column(Integer)
    returns: Mapped[int] = mapped_column(Integer)
    visitors: Mapped[int] = mapped_column(Integer)


class RollupStoreSkuDay(Base):
    """Units, sales and sale lines (with a promotion or not) of one SKU in one store's business day."""

    __tablename__ = "rollup_store_sku_day"
    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    units: Mapped[Decimal] = mapped_column(Quantity)
    sales: Mapped[Decimal] = mapped_column(Money)
    lines: Mapped[int] = mapped_column(Integer)
    promo_lines: Mapped[int] = mapped_column(Integer)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, server_default=func.now(), index=True)
    source: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    raw_payload: Mapped[str] = mapped_column(Text)
    # A redelivered message (the worker died between commit and ack) must not be dead-lettered twice.
    payload_sha256: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(200))
    store_id: Mapped[str | None] = mapped_column(String(200))
    # A replay keeps the dead letter and records its outcome: accepted, duplicate or rejected (note: why).
    replayed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    replay_status: Mapped[str | None] = mapped_column(String(20))
    replay_note: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("source", "payload_sha256", name="uq_dead_letters_source_payload"),)


EVENT_TABLES: tuple[str, ...] = (
    "receipts",
    "receipt_lines",
    "consultation_steps",
    "prompt_answers",
    "footfall",
    "stock_snapshots",
    "stock_lots",
)
