"""Rollups: per store and business day (figures and the counter-flow ratios), per store and hour,
and per store × SKU × day, kept up to date as events arrive.

The hour rollup is added to in the transaction that accepts each receipt or footfall count (a
duplicate is never accepted, so it is never counted twice); `store` rewrites it from the raw
events for the store-days it recomputes, which also covers bulk loads that bypass ingest.

Every accepted event marks its store-day dirty, in the transaction that stores it (an ingest
hook). `refresh` recomputes dirty store-days from the raw events with the metric services
(so a rollup equals the service's number) and clears the marks; the scheduler runs it every
minute and `storepulse rollups rebuild` fills a range at once. Readers (`store_day_values`)
take the rollup of a clean store-day and compute a dirty or missing one on the fly, without
writing: a page never shows a stale number and never writes on GET. Today is always read
raw (it is dirty all day long).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, delete, false, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ingest.contract import ConsultationStepEvent, Event, FootfallEvent, ReceiptEvent
from ingest.models import (
    ConsultationStep,
    Footfall,
    Receipt,
    ReceiptLine,
    RollupDirty,
    RollupStoreDay,
    RollupStoreHour,
    RollupStoreSkuDay,
    Store,
)
from ingest.timeseries import business_window
from store_rules.metrics import REACH, Ratio, money, store_days
from store_rules.sales import event_sales, line_net_sql, receipt_sales_sql

log = logging.getLogger(__name__)
RATIOS = ("conversion_rate", "step_completeness", "symptom_completeness", "insurance_pass_rate", "traceability")
BATCH = 200  # store-days recomputed per transaction by `refresh`
HOUR_COUNTERS = ("sales", "transactions", "returns", "visitors")


@dataclass
class DayValues:
    """What a page needs of one store's business day."""

    sales: Decimal = Decimal("0.00")
    transactions: int = 0
    returns: int = 0
    visitors: int = 0
    ratios: dict[str, Ratio] = field(default_factory=dict)
    # When a closed day's figures last changed after they were first rolled up (late data), else None.
    revised_at: datetime | None = None

    def figures(self) -> tuple[Any, ...]:
        """Everything a page shows of the day, to tell whether a recomputation changed it."""
        ratios = tuple((n, self.ratios[n].numerator, self.ratios[n].denominator) for n in sorted(self.ratios))
        return (self.sales, self.transactions, self.returns, self.visitors, ratios)


def _insert(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


# --- marking ---------------------------------------------------------------------------------

_zones: dict[str, str] = {}


def _zone_of(session: Session, store_id: str) -> ZoneInfo:
    if store_id not in _zones:
        store = session.get(Store, store_id)
        _zones[store_id] = store.timezone if store else "Asia/Shanghai"
    return ZoneInfo(_zones[store_id])


def _hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def mark_dirty(session: Session, events: Sequence[Event]) -> None:
    """The ingest hook: mark the store-days each event changes and add receipts and visitors to their hour.

    A consultation step also changes the days of its consultation's earlier steps and of the
    receipts that name it (a step or an insurance correction after midnight changes yesterday's
    ratios), so those days are marked too.
    """
    pairs = {(e.store_id, e.occurred_at.astimezone(_zone_of(session, e.store_id)).date()) for e in events}
    pairs |= _consultation_days(session, [e for e in events if isinstance(e, ConsultationStepEvent)])
    if not pairs:
        return
    now = datetime.now(UTC)
    rows = [{"store_id": s, "day": d, "marked_at": now, "generation": 1} for s, d in sorted(pairs)]
    statement = _insert(session)(RollupDirty).values(rows)
    # Marking again bumps the generation: a refresh that read the old generation then leaves the
    # mark in place, so an event committed while it was computing is rolled up by the next one.
    # marked_at stays the first mark's time, so refresh keeps working oldest-first.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["store_id", "day"], set_={"generation": RollupDirty.__table__.c.generation + 1}
        )
    )
    hours: dict[tuple[str, datetime], dict[str, Any]] = {}
    for event in events:
        if isinstance(event, ReceiptEvent | FootfallEvent):
            key = (event.store_id, _hour(event.occurred_at))
            row = hours.setdefault(key, _empty_hour(*key))
            if isinstance(event, ReceiptEvent):
                row["sales"] += event_sales(event)
                row["transactions" if event.kind == "sale" else "returns"] += 1
            else:
                row["visitors"] += event.count_in
    if hours:
        statement = _insert(session)(RollupStoreHour).values(list(hours.values()))  # one row per store-hour
        table = RollupStoreHour.__table__
        added = {
            c: table.c[c] + getattr(statement.excluded, c) for c in ("sales", "transactions", "returns", "visitors")
        }
        session.execute(statement.on_conflict_do_update(index_elements=["store_id", "hour_start"], set_=added))


def _consultation_days(session: Session, steps: Sequence[ConsultationStepEvent]) -> set[tuple[str, date]]:
    """Store-days whose ratios these steps change: days of the same consultations' other steps and receipts.

    Looked up within the metrics' reach around the steps (the metrics read no further), which also
    keeps a consultation id reused weeks later apart from the old one.
    """
    if not steps:
        return set()
    times: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for e in steps:
        times[(e.store_id, e.consultation_id)].append(e.occurred_at)
    keys = set(times)
    start = min(e.occurred_at for e in steps) - REACH
    end = max(e.occurred_at for e in steps) + REACH
    store_ids = sorted({store_id for store_id, _ in keys})
    consultation_ids = sorted({consultation_id for _, consultation_id in keys})
    found: set[tuple[str, datetime]] = set()
    for table in (ConsultationStep, Receipt):
        rows = session.execute(
            select(table.store_id, table.consultation_id, table.occurred_at)
            .where(
                table.store_id.in_(store_ids),
                table.consultation_id.in_(consultation_ids),
                table.occurred_at >= start,
                table.occurred_at <= end,
            )
            .distinct()
        )
        found.update(
            (store_id, at)
            for store_id, consultation_id, at in rows
            if consultation_id is not None
            and any(abs(at - t) <= REACH for t in times.get((store_id, consultation_id), ()))
        )
    return {(store_id, at.astimezone(_zone_of(session, store_id)).date()) for store_id, at in found}


# --- computing -------------------------------------------------------------------------------


def compute(session: Session, stores: Sequence[Store], days: Sequence[date]) -> dict[tuple[str, date], DayValues]:
    """Every (store, day) of the product from the raw events, in a few grouped queries per time zone."""
    out: dict[tuple[str, date], DayValues] = {(s.store_id, d): DayValues() for s in stores for d in days}
    if not out:
        return out
    by_zone: dict[str, list[str]] = defaultdict(list)
    for store in stores:
        by_zone[store.timezone].append(store.store_id)
    for zone_name, ids in by_zone.items():
        tz = ZoneInfo(zone_name)
        for day in days:
            start, end = business_window(day, tz)
            for store_id, total, sales, returns in session.execute(
                select(
                    Receipt.store_id, func.sum(receipt_sales_sql()),
                    func.sum(case((Receipt.kind == "sale", 1), else_=0)),
                    func.sum(case((Receipt.kind == "sale", 0), else_=1)),
                )
                .where(Receipt.store_id.in_(ids), Receipt.occurred_at >= start, Receipt.occurred_at < end)
                .group_by(Receipt.store_id)
            ):  # fmt: skip
                values = out[(store_id, day)]
                values.sales = money(total)
                values.transactions, values.returns = int(sales or 0), int(returns or 0)
            for store_id, visitors in session.execute(
                select(Footfall.store_id, func.sum(Footfall.count_in))
                .where(Footfall.store_id.in_(ids), Footfall.occurred_at >= start, Footfall.occurred_at < end)
                .group_by(Footfall.store_id)
            ):
                out[(store_id, day)].visitors = int(visitors or 0)
    metrics = store_days(session=session, store_ids=[s.store_id for s in stores], days=days)
    for key, day_metrics in metrics.items():
        out[key].ratios = {name: getattr(day_metrics, name) for name in RATIOS}
    return out


def _sku_days(session: Session, stores: Sequence[Store], day: date) -> list[dict[str, Any]]:
    """Sale lines per store and SKU of one business day, one grouped query per time zone."""
    by_zone: dict[str, list[str]] = defaultdict(list)
    for store in stores:
        by_zone[store.timezone].append(store.store_id)
    out: list[dict[str, Any]] = []
    for zone_name, ids in by_zone.items():
        start, end = business_window(day, ZoneInfo(zone_name))
        rows = session.execute(
            select(
                ReceiptLine.store_id, ReceiptLine.sku, func.sum(ReceiptLine.qty), func.sum(line_net_sql()),
                func.count(), func.sum(case((ReceiptLine.promotion_id.is_not(None), 1), else_=0)),
            )
            .where(
                ReceiptLine.store_id.in_(ids), ReceiptLine.kind == "sale",
                ReceiptLine.occurred_at >= start, ReceiptLine.occurred_at < end,
            )
            .group_by(ReceiptLine.store_id, ReceiptLine.sku)
        )  # fmt: skip
        out.extend(
            {"store_id": store_id, "day": day, "sku": sku, "units": Decimal(str(units or 0)),
             "sales": Decimal(str(amount or 0)), "lines": int(lines), "promo_lines": int(promo or 0)}
            for store_id, sku, units, amount, lines, promo in rows
        )  # fmt: skip
    return out


def _rewrite_hours(session: Session, stores: Sequence[Store], day: date) -> None:
    """The day's hour rows of these stores, from the raw events (bulk loads bypass the ingest hook)."""
    by_zone: dict[str, list[str]] = defaultdict(list)
    for store in stores:
        by_zone[store.timezone].append(store.store_id)
    for zone_name, ids in by_zone.items():
        start, end = business_window(day, ZoneInfo(zone_name))
        hours: dict[tuple[str, datetime], dict[str, Any]] = {}
        receipts = select(Receipt.store_id, Receipt.occurred_at, Receipt.kind, receipt_sales_sql()).where(
            Receipt.store_id.in_(ids), Receipt.occurred_at >= start, Receipt.occurred_at < end
        )
        for store_id, at, kind, sales in session.execute(receipts):
            row = hours.setdefault((store_id, _hour(at)), _empty_hour(store_id, _hour(at)))
            row["sales"] += money(sales)
            row["transactions" if kind == "sale" else "returns"] += 1
        footfall = select(Footfall.store_id, Footfall.occurred_at, Footfall.count_in).where(
            Footfall.store_id.in_(ids), Footfall.occurred_at >= start, Footfall.occurred_at < end
        )
        for store_id, at, count in session.execute(footfall):
            hours.setdefault((store_id, _hour(at)), _empty_hour(store_id, _hour(at)))["visitors"] += int(count or 0)
        session.execute(
            delete(RollupStoreHour).where(
                RollupStoreHour.store_id.in_(ids), RollupStoreHour.hour_start >= start, RollupStoreHour.hour_start < end
            )
        )
        if hours:
            session.execute(_insert(session)(RollupStoreHour), list(hours.values()))


def _empty_hour(store_id: str, hour: datetime) -> dict[str, Any]:
    return {
        "store_id": store_id,
        "hour_start": hour,
        "sales": Decimal(0),
        "transactions": 0,
        "returns": 0,
        "visitors": 0,
    }


def _row(store_id: str, day: date, values: DayValues, now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = {
        "store_id": store_id, "day": day, "sales": values.sales, "transactions": values.transactions,
        "returns": values.returns, "visitors": values.visitors, "computed_at": now, "revised_at": values.revised_at,
    }  # fmt: skip
    for name in RATIOS:
        ratio = values.ratios.get(name, Ratio(0, 0))
        row[f"{name}_num"], row[f"{name}_den"] = ratio.numerator, ratio.denominator
    return row


def store(session: Session, pairs: Iterable[tuple[str, date]], now: datetime | None = None) -> int:
    """Recompute and upsert the rollups of these store-days (and their SKU rows).

    A store-day that had a rollup whose figures now differ is stamped revised (late data changed a
    closed day after it was first shown); an unchanged one keeps its stamp.
    """
    now = now or datetime.now(UTC)
    wanted = sorted(set(pairs))
    if not wanted:
        return 0
    stores = {s.store_id: s for s in session.scalars(select(Store).where(Store.store_id.in_({s for s, _ in wanted})))}
    by_day: dict[date, list[str]] = defaultdict(list)
    for store_id, day in wanted:
        if store_id in stores:
            by_day[day].append(store_id)
    insert = _insert(session)
    written = 0
    for day, ids in sorted(by_day.items()):
        values = compute(session, [stores[i] for i in ids], [day])
        before = _rolled_up(session, ids, [day])
        rows = []
        for store_id in ids:
            fresh, old = values[(store_id, day)], before.get((store_id, day))
            if old is not None:
                fresh.revised_at = old.revised_at if old.figures() == fresh.figures() else now
            rows.append(_row(store_id, day, fresh, now))
        statement = insert(RollupStoreDay).values(rows)
        updates = {c: getattr(statement.excluded, c) for c in rows[0] if c not in ("store_id", "day")}
        session.execute(statement.on_conflict_do_update(index_elements=["store_id", "day"], set_=updates))
        session.execute(
            delete(RollupStoreSkuDay).where(RollupStoreSkuDay.day == day, RollupStoreSkuDay.store_id.in_(ids))
        )
        _rewrite_hours(session, [stores[i] for i in ids], day)
        sku_rows = _sku_days(session, [stores[i] for i in ids], day)
        if sku_rows:  # executemany: the driver batches, whatever the number of rows
            session.execute(insert(RollupStoreSkuDay), sku_rows)
        written += len(rows)
    return written


def _closed_days(session: Session, now: datetime) -> ColumnElement[bool]:
    """Dirty marks of days that have ended in their store's time zone (one condition per zone)."""
    zones = sorted(set(session.scalars(select(Store.timezone).distinct())))
    return or_(
        false(),
        *(and_(Store.timezone == zone, RollupDirty.day < now.astimezone(ZoneInfo(zone)).date()) for zone in zones),
    )


def refresh(*, session: Session, limit: int = BATCH, now: datetime | None = None) -> int:
    """Recompute up to `limit` dirty closed store-days (oldest marks first) and clear their marks.

    Today's store-days stay marked and are not even read: they change all day, readers compute
    today raw anyway, and with more stores than `limit` they would crowd out the past days.
    A mark set again while recomputing survives: its generation moved on, and only the
    generation read here is cleared.
    """
    now = now or datetime.now(UTC)
    marks = session.execute(
        select(RollupDirty.store_id, RollupDirty.day, RollupDirty.generation)
        .join(Store, Store.store_id == RollupDirty.store_id)
        .where(_closed_days(session, now))
        .order_by(RollupDirty.marked_at, RollupDirty.store_id, RollupDirty.day)
        .limit(limit)
    ).all()
    if not marks:
        return 0
    written = store(session, [(s, d) for s, d, _ in marks], now)
    for store_id, day, generation in marks:
        session.execute(
            delete(RollupDirty).where(
                RollupDirty.store_id == store_id, RollupDirty.day == day, RollupDirty.generation == generation
            )
        )
    return written


def rebuild(*, session: Session, first: date, last: date, store_ids: Iterable[str] | None = None) -> int:
    """Recompute every store-day of the range now (e.g. after an import or a bulk load)."""
    query = select(Store.store_id)
    if store_ids is not None:
        query = query.where(Store.store_id.in_(list(store_ids)))
    ids = list(session.scalars(query))
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    return store(session, [(s, d) for s in ids for d in days])


# --- reading ---------------------------------------------------------------------------------


def _rolled_up(session: Session, ids: Sequence[str], days: Sequence[date]) -> dict[tuple[str, date], DayValues]:
    """The stored rollups of these stores and days (whether clean or not)."""
    out: dict[tuple[str, date], DayValues] = {}
    if not ids or not days:
        return out
    # Plain column tuples, not ORM objects: a 90-day chain view reads 18,000 of these rows.
    ratio_columns = [getattr(RollupStoreDay, f"{n}_{part}") for n in RATIOS for part in ("num", "den")]
    rows = session.execute(
        select(
            RollupStoreDay.store_id, RollupStoreDay.day, RollupStoreDay.sales, RollupStoreDay.transactions,
            RollupStoreDay.returns, RollupStoreDay.visitors, RollupStoreDay.revised_at, *ratio_columns,
        ).where(RollupStoreDay.store_id.in_(ids), RollupStoreDay.day >= min(days), RollupStoreDay.day <= max(days))
    )  # fmt: skip
    wanted = set(days)
    for store_id, day, sales, transactions, returns, visitors, revised_at, *ratio_values in rows:
        if day in wanted:
            out[(store_id, day)] = DayValues(
                sales=money(sales), transactions=transactions, returns=returns,
                visitors=visitors, revised_at=revised_at,
                ratios={n: Ratio(ratio_values[2 * i], ratio_values[2 * i + 1]) for i, n in enumerate(RATIOS)},
            )  # fmt: skip
    return out


def store_day_values(
    *, session: Session, stores: Sequence[Store], days: Sequence[date]
) -> dict[tuple[str, date], DayValues]:
    """(store, day) → its values: the rollup when it is clean, else computed from the raw events.

    A dirty day whose fresh figures differ from its rollup reads as revised since its mark.
    """
    ids = [s.store_id for s in stores]
    if not ids or not days:
        return {}
    out = _rolled_up(session, ids, days)
    dirty = {
        (s, d): marked_at
        for s, d, marked_at in session.execute(
            select(RollupDirty.store_id, RollupDirty.day, RollupDirty.marked_at).where(
                RollupDirty.store_id.in_(ids), RollupDirty.day >= min(days), RollupDirty.day <= max(days)
            )
        )
    }
    wanted = set(days)
    stale = {key for key in dirty if key[1] in wanted} | {(s, d) for s in ids for d in days if (s, d) not in out}
    if stale:
        stale_ids = {store_id for store_id, _ in stale}
        fresh_stores = [s for s in stores if s.store_id in stale_ids]
        fresh_days = sorted({d for _, d in stale})
        computed = compute(session, fresh_stores, fresh_days)
        for key in stale:
            if key in computed:
                fresh, old = computed[key], out.get(key)
                if old is not None:
                    changed = old.figures() != fresh.figures()
                    fresh.revised_at = dirty.get(key, old.revised_at) if changed else old.revised_at
                out[key] = fresh
    return out


def pending(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(RollupDirty)) or 0)
