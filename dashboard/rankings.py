"""Stores ranked over a span of business days, and the morning meeting report (晨会) built on them.

Every figure comes from the services that define it: sales, transactions and visitors from the
event tables (as on the chain page), the counter-flow ratios from `store_rules.metrics`
(numerators and denominators summed over the days, then divided), alert response timeliness
from the alert service and promotion execution from the promotion service. A page, an export
and a test therefore read the same numbers.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from openpyxl import Workbook
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.models import Region, Store
from store_rules.alerts.service import response_timeliness
from store_rules.metrics import Ratio
from store_rules.promotions.service import execution_by_store
from store_rules.rollups import DayValues, store_day_values

FLOW_METRICS = ("step_completeness", "symptom_completeness", "insurance_pass_rate", "traceability")
RATIO_KEYS = ("conversion_rate", *FLOW_METRICS, "timeliness", "execution")
SORT_KEYS = ("sales", "transactions", "visitors", "average_ticket", *RATIO_KEYS)
# An exception of the morning report: a store whose ratio is below this, in percent. The pass
# rate follows the brief's watch (65 %); the others are the chain's usual bars.
EXCEPTION_BELOW: dict[str, float] = {
    "insurance_pass_rate": 65.0,
    "symptom_completeness": 80.0,
    "step_completeness": 80.0,
    "traceability": 80.0,
    "timeliness": 80.0,
    "execution": 70.0,
}
NAMES: dict[str, tuple[str, str]] = {
    "sales": ("销售额", "sales"),
    "transactions": ("交易笔数", "transactions"),
    "visitors": ("进店人数", "visitors"),
    "average_ticket": ("客单价", "average ticket"),
    "conversion_rate": ("转化率", "conversion"),
    "step_completeness": ("过程数据完整率", "step completeness"),
    "symptom_completeness": ("症状记录完整率", "symptom-record completeness"),
    "insurance_pass_rate": ("医保核验通过率", "insurance pass rate"),
    "traceability": ("销售行为可追溯率", "traceability"),
    "timeliness": ("预警响应及时率", "alert response timeliness"),
    "execution": ("促销核销率", "promotion execution"),
}


@dataclass
class StoreRank:
    store: Store
    region: Region
    sales: Decimal = Decimal("0.00")
    transactions: int = 0
    visitors: int = 0
    ratios: dict[str, Ratio] = field(default_factory=dict)
    # Local time at which late data last changed one of the period's closed days, if it did.
    revised_at: datetime | None = None

    @property
    def average_ticket(self) -> Decimal | None:
        return (self.sales / self.transactions).quantize(Decimal("0.01")) if self.transactions else None

    def value(self, key: str) -> float | None:
        """The number a column sorts by (None sorts last)."""
        if key in self.ratios:
            return self.ratios[key].ratio
        raw = getattr(self, key)
        return None if raw is None else float(raw)


def span(first: date, last: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start of `first`, end of `last`) in UTC, business days in `tz`."""
    start = datetime.combine(first, time(), tz).astimezone(UTC)
    end = datetime.combine(last + timedelta(days=1), time(), tz).astimezone(UTC)
    return start, end


def store_ranking(
    *,
    session: Session,
    first: date,
    last: date,
    timezone: str,
    store_ids: list[str] | None = None,
    values: dict[tuple[str, date], DayValues] | None = None,
) -> list[StoreRank]:
    """Every active store (or the given ones) over the business days [first, last], in store order."""
    tz = ZoneInfo(timezone)
    query = select(Store).where(Store.active.is_(True)).order_by(Store.store_id)
    if store_ids is not None:
        query = query.where(Store.store_id.in_(store_ids))
    stores = list(session.scalars(query))
    regions = {r.region_id: r for r in session.scalars(select(Region))}
    ranks = {s.store_id: StoreRank(store=s, region=regions[s.region_id]) for s in stores}
    if not ranks:
        return []
    ids = list(ranks)
    start, end = span(first, last, tz)
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    # Closed days come from the rollups (a dirty or missing one is computed on the fly).
    if values is None:
        values = store_day_values(session=session, stores=stores, days=days)
    for (store_id, _day), day_values in values.items():
        if store_id not in ranks:
            continue
        rank = ranks[store_id]
        rank.sales += day_values.sales
        rank.transactions += day_values.transactions
        rank.visitors += day_values.visitors
        if day_values.revised_at is not None:
            revised = day_values.revised_at.astimezone(tz)
            rank.revised_at = max(rank.revised_at, revised) if rank.revised_at else revised
        for key in ("conversion_rate", *FLOW_METRICS):
            ratio = day_values.ratios.get(key, Ratio(0, 0))
            sums[(store_id, key)][0] += ratio.numerator
            sums[(store_id, key)][1] += ratio.denominator
    timeliness = response_timeliness(session=session, since=start, until=end).by_store
    execution = execution_by_store(session=session, since=start, until=end, store_ids=ids)
    for store_id, rank in ranks.items():
        for key in ("conversion_rate", *FLOW_METRICS):
            rank.ratios[key] = Ratio(*sums[(store_id, key)])
        rank.ratios["timeliness"] = timeliness.get(store_id, Ratio(0, 0))
        rank.ratios["execution"] = execution.get(store_id, Ratio(0, 0))
    return list(ranks.values())


def sort_ranking(rows: list[StoreRank], key: str, descending: bool = True) -> list[StoreRank]:
    """Sorted by a column; stores without a value (nothing to divide) always last."""
    if key not in SORT_KEYS:
        key = "sales"
    present = [r for r in rows if r.value(key) is not None]
    missing = [r for r in rows if r.value(key) is None]
    sign = -1.0 if descending else 1.0
    present.sort(key=lambda r: (sign * (r.value(key) or 0.0), r.store.store_id))  # ties: in store order
    return present + sorted(missing, key=lambda r: r.store.store_id)


def exceptions(rows: list[StoreRank], lang: str) -> list[dict[str, Any]]:
    """「温州鹿城店 症状记录完整率 41%」: every ratio under its bar, worst first."""
    found = []
    for row in rows:
        for key, bar in EXCEPTION_BELOW.items():
            ratio = row.ratios.get(key)
            if ratio is None or ratio.percent is None or ratio.percent >= bar:
                continue
            zh, en = NAMES[key]
            if lang == "zh-CN":
                text = f"{row.store.name_zh} {zh} {ratio.percent:.0f}%"
            else:
                text = f"{row.store.name_en}: {en} {ratio.percent:.0f} %"
            found.append({"store_id": row.store.store_id, "metric": key, "percent": ratio.percent, "bar": bar,
                          "text": text, "shortfall": bar - ratio.percent})  # fmt: skip
    return sorted(found, key=lambda e: (-e["shortfall"], e["store_id"], e["metric"]))


def morning_day(timezone: str, now: datetime | None = None) -> date:
    """The meeting reviews the business day before today."""
    return (now or datetime.now(UTC)).astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)


# --- exports ---------------------------------------------------------------------------------


def _row_values(row: StoreRank, rank: int, lang: str) -> list[Any]:
    values: list[Any] = [
        rank, row.store.store_id, row.store.name_zh if lang == "zh-CN" else row.store.name_en,
        row.region.name_zh if lang == "zh-CN" else row.region.name_en, float(row.sales), row.transactions,
        row.visitors, float(row.average_ticket) if row.average_ticket is not None else None,
    ]  # fmt: skip
    for key in RATIO_KEYS:
        percent = row.ratios[key].percent
        values.append(None if percent is None else round(percent, 1))
    values.append(row.revised_at.strftime("%Y-%m-%d %H:%M") if row.revised_at else None)
    return values


def headers(lang: str) -> list[str]:
    pick = 0 if lang == "zh-CN" else 1
    fixed = [("排名", "rank"), ("门店编号", "store id"), ("门店", "store"), ("区域", "region")]
    columns = ("sales", "transactions", "visitors", "average_ticket", *RATIO_KEYS)
    revised = ("数据修订于（本地时间）", "revised at (local time)")[pick]
    return (
        [f[pick] for f in fixed] + [NAMES[k][pick] + (" (%)" if k in RATIO_KEYS else "") for k in columns] + [revised]
    )


def to_csv(rows: list[StoreRank], lang: str) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(headers(lang))
    for rank, row in enumerate(rows, start=1):
        writer.writerow(["" if v is None else v for v in _row_values(row, rank, lang)])
    # Excel opens UTF-8 with a BOM correctly; without it Chinese names become mojibake.
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def to_xlsx(rows: list[StoreRank], found: list[dict[str, Any]], day: date, lang: str) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "晨会" if lang == "zh-CN" else "Morning report"
    sheet.append(headers(lang))
    for rank, row in enumerate(rows, start=1):
        sheet.append(_row_values(row, rank, lang))
    notes = book.create_sheet("异常" if lang == "zh-CN" else "Exceptions")
    notes.append(["日期" if lang == "zh-CN" else "day", day.isoformat()])
    for item in found:
        notes.append([item["text"]])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


# --- the chain view: regions compared, daily series ------------------------------------------


@dataclass
class RegionRank:
    region: Region
    stores: int = 0
    sales: Decimal = Decimal("0.00")
    transactions: int = 0
    visitors: int = 0
    sums: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def ratios(self) -> dict[str, Ratio]:
        return {key: Ratio(*self.sums[key]) for key in RATIO_KEYS}

    @property
    def average_ticket(self) -> Decimal | None:
        return (self.sales / self.transactions).quantize(Decimal("0.01")) if self.transactions else None


def by_region(rows: list[StoreRank]) -> list[RegionRank]:
    """Region totals of store rows: amounts added, ratios' cases added before dividing."""
    regions: dict[str, RegionRank] = {}
    for row in rows:
        entry = regions.setdefault(row.region.region_id, RegionRank(region=row.region))
        entry.stores += 1
        entry.sales += row.sales
        entry.transactions += row.transactions
        entry.visitors += row.visitors
        for key, ratio in row.ratios.items():
            entry.sums[key][0] += ratio.numerator
            entry.sums[key][1] += ratio.denominator
    return [regions[key] for key in sorted(regions)]


@dataclass
class DayPoint:
    day: date
    sales: Decimal = Decimal("0.00")
    transactions: int = 0
    visitors: int = 0

    @property
    def conversion(self) -> float | None:
        return self.transactions / self.visitors if self.visitors else None


def daily_series(
    *,
    session: Session,
    first: date,
    last: date,
    timezone: str,
    store_ids: list[str] | None = None,
    values: dict[tuple[str, date], DayValues] | None = None,
) -> list[DayPoint]:
    """Sales, transactions and visitors of the given stores (or all) per business day, from the rollups."""
    query = select(Store).where(Store.active.is_(True))
    if store_ids is not None:
        query = query.where(Store.store_id.in_(store_ids))
    stores = list(session.scalars(query))
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    points = {day: DayPoint(day) for day in days}
    wanted = {s.store_id for s in stores}
    if values is None:
        values = store_day_values(session=session, stores=stores, days=days)
    for (store_id, day), day_values in values.items():
        if store_id not in wanted or day not in points:
            continue
        point = points[day]
        point.sales += day_values.sales
        point.transactions += day_values.transactions
        point.visitors += day_values.visitors
    return [points[d] for d in days]
