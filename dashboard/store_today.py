"""Today's figures of a store and of the chain (plain functions that take a session).

"Today" is the store's local business day (``stores.timezone``), from local midnight to the
next. The SQL is portable (SQLite and PostgreSQL): the queries select rows or simple sums
in a UTC time range and the hour buckets are made in Python, in the store's time zone.

Definitions (DESIGN.md): transactions = sale receipts; sales = the sum of receipt totals,
returns included (they are negative), so sales are net; visitors = footfall ``in``;
conversion = transactions ÷ visitors; average ticket = sales ÷ transactions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ingest.models import Footfall, Member, Receipt, ReceiptLine, Region, RollupStoreHour, Sku, Staff, Store
from ingest.timeseries import business_window
from store_rules.sales import receipt_sales_sql

ZERO = Decimal("0.00")
CENT = Decimal("0.01")
OPEN_HOURS = range(8, 22)  # always shown in the by-hour table, with or without data


def _money(value: Any) -> Decimal:
    # SQLite hands sums back as floats: go through str() so 0.1 + 0.2 stays 0.30.
    return ZERO if value is None else Decimal(str(value)).quantize(CENT)


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "Asia/Shanghai")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("Asia/Shanghai")


@dataclass
class Figures:
    sales: Decimal = ZERO
    transactions: int = 0
    returns: int = 0
    visitors: int = 0

    @property
    def conversion(self) -> float | None:
        return self.transactions / self.visitors if self.visitors else None

    @property
    def average_ticket(self) -> Decimal | None:
        return (self.sales / self.transactions).quantize(CENT) if self.transactions else None

    def add(self, other: Figures) -> None:
        self.sales += other.sales
        self.transactions += other.transactions
        self.returns += other.returns
        self.visitors += other.visitors


@dataclass
class HourFigures(Figures):
    hour: int = 0


@dataclass(frozen=True)
class LineView:
    sku: str
    name_zh: str | None
    name_en: str | None
    qty: Decimal
    amount: Decimal


@dataclass(frozen=True)
class ReceiptView:
    occurred_at: datetime  # local time of the store
    receipt_id: str
    terminal_id: str
    kind: str
    total: Decimal
    staff_name: str | None
    member_name: str | None
    consultation_id: str | None
    lines: list[LineView]


@dataclass
class StoreToday:
    store: Store
    region: Region | None
    business_day: date
    timezone: str
    as_of: datetime  # local
    figures: Figures
    hours: list[HourFigures]
    latest: list[ReceiptView]


def store_today(*, session: Session, store_id: str, now: datetime | None = None, latest: int = 10) -> StoreToday | None:
    """Today's figures, hour by hour, and the latest receipts of one store; None for an unknown store."""
    store = session.get(Store, store_id)
    if store is None:
        return None
    tz = zone(store.timezone)
    local_now = (now or datetime.now(UTC)).astimezone(tz)
    start, end = business_window(local_now.date(), tz)

    hours: dict[int, HourFigures] = {hour: HourFigures(hour=hour) for hour in OPEN_HOURS}
    # Closed hours from the hour rollup (added to as events are accepted), the current hour raw.
    current = local_now.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    for row in session.scalars(
        select(RollupStoreHour).where(
            RollupStoreHour.store_id == store_id, RollupStoreHour.hour_start >= start,
            RollupStoreHour.hour_start < current,
        )
    ):  # fmt: skip
        hour = row.hour_start.astimezone(tz).hour
        bucket = hours.setdefault(hour, HourFigures(hour=hour))
        bucket.sales += _money(row.sales)
        bucket.transactions += row.transactions
        bucket.returns += row.returns
        bucket.visitors += row.visitors
    start = max(start, current)
    receipts = session.execute(
        select(Receipt.occurred_at, Receipt.kind, receipt_sales_sql()).where(
            Receipt.store_id == store_id, Receipt.occurred_at >= start, Receipt.occurred_at < end
        )
    )
    for occurred_at, kind, sales in receipts:
        bucket = hours.setdefault(occurred_at.astimezone(tz).hour, HourFigures(hour=occurred_at.astimezone(tz).hour))
        bucket.sales += _money(sales)
        if kind == "sale":
            bucket.transactions += 1
        else:
            bucket.returns += 1
    footfall = session.execute(
        select(Footfall.occurred_at, Footfall.count_in).where(
            Footfall.store_id == store_id, Footfall.occurred_at >= start, Footfall.occurred_at < end
        )
    )
    for occurred_at, count_in in footfall:
        hour = occurred_at.astimezone(tz).hour
        hours.setdefault(hour, HourFigures(hour=hour)).visitors += int(count_in or 0)

    figures = Figures()
    for bucket in hours.values():
        figures.add(bucket)
    start, _ = business_window(local_now.date(), tz)
    return StoreToday(
        store=store,
        region=session.get(Region, store.region_id),
        business_day=local_now.date(),
        timezone=str(tz.key),
        as_of=local_now,
        figures=figures,
        hours=[hours[hour] for hour in sorted(hours)],
        latest=latest_receipts(session=session, store_id=store_id, start=start, end=end, tz=tz, limit=latest),
    )


def latest_receipts(
    *, session: Session, store_id: str, start: datetime, end: datetime, tz: ZoneInfo, limit: int = 10
) -> list[ReceiptView]:
    rows = list(
        session.execute(
            select(
                Receipt.event_id, Receipt.occurred_at, Receipt.receipt_id, Receipt.terminal_id, Receipt.kind,
                Receipt.total, Receipt.staff_id, Receipt.member_id, Receipt.consultation_id,
            )
            .where(Receipt.store_id == store_id, Receipt.occurred_at >= start, Receipt.occurred_at < end)
            .order_by(Receipt.occurred_at.desc(), Receipt.event_id.desc())
            .limit(limit)
        )
    )  # fmt: skip
    if not rows:
        return []
    event_ids = [row.event_id for row in rows]
    lines: dict[str, list[tuple[int, str, Decimal, Decimal]]] = defaultdict(list)
    for event_id, line_no, sku, qty, amount in session.execute(
        select(ReceiptLine.event_id, ReceiptLine.line_no, ReceiptLine.sku, ReceiptLine.qty, ReceiptLine.amount).where(
            ReceiptLine.event_id.in_(event_ids),
            ReceiptLine.occurred_at >= start,
            ReceiptLine.occurred_at < end,
        )
    ):
        lines[event_id].append((line_no, sku, Decimal(str(qty)), _money(amount)))
    skus = _lookup(session, Sku, Sku.sku, (sku for entries in lines.values() for _, sku, _, _ in entries))
    staff = _lookup(session, Staff, Staff.staff_id, (row.staff_id for row in rows))
    members = _lookup(session, Member, Member.member_id, (row.member_id for row in rows))
    views = []
    for row in rows:
        views.append(
            ReceiptView(
                occurred_at=row.occurred_at.astimezone(tz),
                receipt_id=row.receipt_id,
                terminal_id=row.terminal_id,
                kind=row.kind,
                total=_money(row.total),
                staff_name=staff[row.staff_id].name if row.staff_id in staff else row.staff_id,
                member_name=members[row.member_id].name if row.member_id in members else row.member_id,
                consultation_id=row.consultation_id,
                lines=[
                    LineView(
                        sku=sku,
                        name_zh=skus[sku].name_zh if sku in skus else None,
                        name_en=skus[sku].name_en if sku in skus else None,
                        qty=qty.normalize() if qty == qty.to_integral_value() else qty,
                        amount=amount,
                    )
                    for _, sku, qty, amount in sorted(lines.get(row.event_id, []))
                ],
            )
        )
    return views


def _lookup(session: Session, model: Any, key: Any, values: Iterable[str | None]) -> dict[str, Any]:
    wanted = sorted({value for value in values if value})
    if not wanted:
        return {}
    return {getattr(row, key.key): row for row in session.scalars(select(model).where(key.in_(wanted)))}


# --- the chain ---------------------------------------------------------------------------


@dataclass
class StoreRow:
    store: Store
    business_day: date
    figures: Figures


@dataclass
class RegionRow:
    region: Region
    stores: list[StoreRow] = field(default_factory=list)
    figures: Figures = field(default_factory=Figures)


@dataclass
class ChainToday:
    regions: list[RegionRow]
    figures: Figures
    as_of: datetime


def chain_today(*, session: Session, now: datetime | None = None, timezone: str = "Asia/Shanghai") -> ChainToday:
    """Today's figures of every active store, grouped by region (one query per table and time zone)."""
    now = now or datetime.now(UTC)
    stores = list(session.scalars(select(Store).where(Store.active.is_(True)).order_by(Store.store_id)))
    regions = {r.region_id: r for r in session.scalars(select(Region).order_by(Region.region_id))}
    by_zone: dict[str, list[Store]] = defaultdict(list)
    for store in stores:
        by_zone[str(zone(store.timezone).key)].append(store)

    figures: dict[str, Figures] = {store.store_id: Figures() for store in stores}
    days: dict[str, date] = {}
    for zone_name, members in by_zone.items():
        tz = ZoneInfo(zone_name)
        day = now.astimezone(tz).date()
        start, end = business_window(day, tz)
        ids = [store.store_id for store in members]
        for store in members:
            days[store.store_id] = day
        # Today's closed hours from the hour rollup, the current hour from the raw events.
        current = now.astimezone(tz).replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        for store_id, hour_sales, hour_transactions, hour_returns, hour_visitors in session.execute(
            select(
                RollupStoreHour.store_id, func.sum(RollupStoreHour.sales), func.sum(RollupStoreHour.transactions),
                func.sum(RollupStoreHour.returns), func.sum(RollupStoreHour.visitors),
            )
            .where(
                RollupStoreHour.store_id.in_(ids), RollupStoreHour.hour_start >= start,
                RollupStoreHour.hour_start < current,
            )
            .group_by(RollupStoreHour.store_id)
        ):  # fmt: skip
            entry = figures[store_id]
            entry.sales += _money(hour_sales)
            entry.transactions += int(hour_transactions or 0)
            entry.returns += int(hour_returns or 0)
            entry.visitors += int(hour_visitors or 0)
        start = max(start, current)
        sales = session.execute(
            select(
                Receipt.store_id,
                func.sum(receipt_sales_sql()),
                func.sum(case((Receipt.kind == "sale", 1), else_=0)),
                func.sum(case((Receipt.kind == "sale", 0), else_=1)),
            )
            .where(Receipt.store_id.in_(ids), Receipt.occurred_at >= start, Receipt.occurred_at < end)
            .group_by(Receipt.store_id)
        )
        for store_id, total, transactions, returns in sales:
            entry = figures[store_id]
            entry.sales += _money(total)
            entry.transactions += int(transactions or 0)
            entry.returns += int(returns or 0)
        visitors = session.execute(
            select(Footfall.store_id, func.sum(Footfall.count_in))
            .where(Footfall.store_id.in_(ids), Footfall.occurred_at >= start, Footfall.occurred_at < end)
            .group_by(Footfall.store_id)
        )
        for store_id, count_in in visitors:
            figures[store_id].visitors += int(count_in or 0)

    rows: dict[str, RegionRow] = {}
    total = Figures()
    for store in stores:
        region = regions.get(store.region_id) or Region(region_id=store.region_id, name_zh="", name_en="")
        row = rows.setdefault(store.region_id, RegionRow(region=region))
        row.stores.append(StoreRow(store=store, business_day=days[store.store_id], figures=figures[store.store_id]))
        row.figures.add(figures[store.store_id])
        total.add(figures[store.store_id])
    # Regions in the order of their first store (S001's region first).
    return ChainToday(regions=list(rows.values()), figures=total, as_of=now.astimezone(ZoneInfo(timezone)))
