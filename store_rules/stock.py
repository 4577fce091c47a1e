"""Stock positions: on-hand and lots per store × SKU as of a moment, safety stock, sales velocity.

Stock events are snapshots: the newest snapshot of a SKU at or before the moment is its
on-hand, and that snapshot's lots are its lots. Safety stock and lead time are master data
(table safety_stock), per store × SKU with a chain-wide row (store "*") as the fallback.
Sales velocity is units sold per local business day from receipt lines of kind `sale`
(returns do not lower the demand a shelf sees).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from ingest.models import ReceiptLine, SafetyStock, Sku, StockLot, StockSnapshot, Store
from ingest.timeseries import business_window

CHAIN_WIDE = "*"
# A snapshot older than this is not a position any more: the stock system stopped reporting
# the SKU. Bounding the search also lets TimescaleDB skip older chunks.
SNAPSHOT_LOOKBACK = timedelta(days=30)


@dataclass(frozen=True)
class LotPosition:
    lot: str
    qty: Decimal
    expires_on: date


@dataclass(frozen=True)
class SkuPosition:
    """What the rules need to know of one SKU in one store."""

    sku: str
    category: str | None
    name: dict[str, str]
    on_hand: Decimal
    snapshot_at: datetime
    safety_stock: Decimal | None = None
    lead_time_days: int | None = None
    lots: tuple[LotPosition, ...] = ()
    daily_sales: dict[date, Decimal] = field(default_factory=dict)

    def sales(self, first: date, last: date) -> Decimal:
        return sum((units for day, units in self.daily_sales.items() if first <= day <= last), Decimal(0))


def snapshots_as_of(*, session: Session, store_id: str, as_of: datetime) -> list[StockSnapshot]:
    """The newest snapshot of every SKU of the store at or before `as_of`."""
    since = as_of - SNAPSHOT_LOOKBACK
    newest = (
        select(StockSnapshot.sku, func.max(StockSnapshot.occurred_at).label("at"))
        .where(
            StockSnapshot.store_id == store_id, StockSnapshot.occurred_at <= as_of, StockSnapshot.occurred_at > since
        )
        .group_by(StockSnapshot.sku)
        .subquery()
    )
    rows = session.scalars(
        select(StockSnapshot)
        .join(newest, and_(StockSnapshot.sku == newest.c.sku, StockSnapshot.occurred_at == newest.c.at))
        .where(StockSnapshot.store_id == store_id, StockSnapshot.occurred_at > since)
        .order_by(StockSnapshot.sku, StockSnapshot.event_id)
    ).all()
    latest: dict[str, StockSnapshot] = {}
    for row in rows:  # two snapshots at the same instant: the higher event id wins, deterministically
        latest[row.sku] = row
    return list(latest.values())


def safety_levels(*, session: Session, store_id: str) -> dict[str, tuple[Decimal, int]]:
    """SKU → (safety stock, lead time in days) for the store; its own rows override the chain-wide ones."""
    rows = session.execute(
        select(SafetyStock.store_id, SafetyStock.sku, SafetyStock.safety_stock, SafetyStock.lead_time_days).where(
            SafetyStock.store_id.in_([store_id, CHAIN_WIDE])
        )
    ).all()
    levels: dict[str, tuple[Decimal, int]] = {}
    # Chain-wide rows first, so the store's own rows overwrite them.
    for _owner, sku, safety, lead in sorted(rows, key=lambda r: r[0] != CHAIN_WIDE):
        levels[sku] = (Decimal(safety), int(lead))
    return levels


def daily_sales(
    *, session: Session, store: Store, first: date, last: date, skus: list[str] | None = None
) -> dict[str, dict[date, Decimal]]:
    """SKU → local business day → units sold, for the days [first, last]."""
    tz = ZoneInfo(store.timezone)
    start, _ = business_window(first, tz)
    _, end = business_window(last, tz)
    query = select(ReceiptLine.sku, ReceiptLine.occurred_at, ReceiptLine.qty).where(
        ReceiptLine.store_id == store.store_id,
        ReceiptLine.kind == "sale",
        ReceiptLine.occurred_at >= start,
        ReceiptLine.occurred_at < end,
    )
    if skus is not None:
        query = query.where(ReceiptLine.sku.in_(skus))
    out: dict[str, dict[date, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for sku, at, qty in session.execute(query):
        out[sku][at.astimezone(tz).date()] += Decimal(qty)
    return {sku: dict(days) for sku, days in out.items()}


def positions(
    *, session: Session, store: Store, as_of: datetime, sales_first: date | None = None, sales_last: date | None = None
) -> list[SkuPosition]:
    """Every SKU of the store with a snapshot, its lots, safety stock and (optionally) daily sales."""
    snapshots = snapshots_as_of(session=session, store_id=store.store_id, as_of=as_of)
    if not snapshots:
        return []
    codes = [s.sku for s in snapshots]
    lots: dict[str, list[LotPosition]] = defaultdict(list)
    lot_rows = session.scalars(
        select(StockLot).where(
            StockLot.store_id == store.store_id,
            StockLot.event_id.in_([s.event_id for s in snapshots]),
            StockLot.occurred_at > as_of - SNAPSHOT_LOOKBACK,
            StockLot.occurred_at <= as_of,
        )
    ).all()
    snapshot_times = {(s.event_id, s.sku): s.occurred_at for s in snapshots}
    for lot in lot_rows:
        if snapshot_times.get((lot.event_id, lot.sku)) == lot.occurred_at:
            lots[lot.sku].append(LotPosition(lot.lot, Decimal(lot.qty), lot.expires_on))
    masters = {row.sku: row for row in session.scalars(select(Sku).where(Sku.sku.in_(codes)))}
    levels = safety_levels(session=session, store_id=store.store_id)
    sales: dict[str, dict[date, Decimal]] = {}
    if sales_first is not None and sales_last is not None:
        sales = daily_sales(session=session, store=store, first=sales_first, last=sales_last, skus=codes)
    out = []
    for snapshot in sorted(snapshots, key=lambda s: s.sku):
        master = masters.get(snapshot.sku)
        safety, lead = levels.get(snapshot.sku, (None, None))
        out.append(
            SkuPosition(
                sku=snapshot.sku,
                category=master.category if master else None,
                name={"zh-CN": master.name_zh, "en": master.name_en}
                if master
                else {"zh-CN": snapshot.sku, "en": snapshot.sku},
                on_hand=Decimal(snapshot.on_hand),
                snapshot_at=snapshot.occurred_at,
                safety_stock=safety,
                lead_time_days=lead,
                lots=tuple(sorted(lots.get(snapshot.sku, []), key=lambda lot: (lot.expires_on, lot.lot))),
                daily_sales=sales.get(snapshot.sku, {}),
            )
        )
    return out


def close_of(day: date, tz: ZoneInfo) -> datetime:
    """The last instant of a local business day, in UTC."""
    _, end = business_window(day, tz)
    return end - timedelta(microseconds=1)


@dataclass(frozen=True)
class StockRisk:
    """One SKU of a store that needs the manager's eye, and why."""

    sku: str
    name: dict[str, str]
    on_hand: Decimal
    safety_stock: Decimal | None
    average_daily_sales: Decimal
    days_of_cover: Decimal | None  # None: nothing sold lately
    lead_time_days: int | None
    expiring_units: Decimal
    first_expiry: date | None
    reasons: tuple[str, ...]  # below_safety / stockout / expiry


def stock_risks(
    *,
    session: Session,
    store: Store,
    now: datetime,
    expiry_days: int = 90,
    sales_days: int = 7,
    default_lead_time_days: int = 3,
) -> list[StockRisk]:
    """SKUs below safety stock, with less cover than their lead time, or with lots expiring soon; worst first."""
    today = now.astimezone(ZoneInfo(store.timezone)).date()
    last = today - timedelta(days=1)
    first = last - timedelta(days=sales_days - 1)
    risks = []
    for position in positions(session=session, store=store, as_of=now, sales_first=first, sales_last=last):
        daily = position.sales(first, last) / sales_days
        cover = position.on_hand / daily if daily > 0 else None
        lead = position.lead_time_days if position.lead_time_days is not None else default_lead_time_days
        soon = [
            lot
            for lot in position.lots
            if lot.qty > 0 and today < lot.expires_on <= today + timedelta(days=expiry_days)
        ]
        reasons = []
        if position.safety_stock is not None and position.on_hand < position.safety_stock:
            reasons.append("below_safety")
        if cover is not None and cover < lead:
            reasons.append("stockout")
        if soon:
            reasons.append("expiry")
        if reasons:
            risks.append(
                StockRisk(
                    sku=position.sku, name=position.name, on_hand=position.on_hand, safety_stock=position.safety_stock,
                    average_daily_sales=daily, days_of_cover=cover, lead_time_days=lead,
                    expiring_units=sum((lot.qty for lot in soon), Decimal(0)),
                    first_expiry=min((lot.expires_on for lot in soon), default=None), reasons=tuple(reasons),
                )
            )  # fmt: skip
    order = {"stockout": 0, "below_safety": 1, "expiry": 2}
    return sorted(risks, key=lambda r: (min(order[x] for x in r.reasons), r.days_of_cover or Decimal(10**6), r.sku))
