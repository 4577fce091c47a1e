"""Store metrics per store and local business day, computed exactly as DESIGN.md defines them.

Plain service functions that take a session; the pages, the rules and the CLI call the same code.
A business day is the store's local day (``stores.timezone``): [local midnight, next local
midnight), converted to UTC for the queries, so an event at 23:30 in Shanghai (15:30 UTC)
belongs to that Shanghai day and not to the next one. The SQL is portable (SQLite and
PostgreSQL): each table is read once for a set of stores and days with plain range
queries, and the grouping into store-days and the counting happen in Python.

Every metric is a `Ratio` (numerator, denominator and the ratio, None when the denominator
is 0) so a page can show "7 / 10 = 70.0 %" and a reader can check the arithmetic.

Definitions (DESIGN.md, "Metrics"; the flow in force is `active_flow`):

- **step completeness** (过程数据完整率) = steps done ÷ steps required, over flow-controlled
  orders. A flow-controlled order is a sale receipt of the day with at least one line whose
  SKU the flow controls (`flow_controlled_skus`). Each such order requires
  ``len(flow.required_steps)`` steps; the steps done are the required steps whose effective
  record (the latest record of the step, `Consultation.effective`) in the order's consultation
  (``receipts.consultation_id``) is ``done``. A skipped step is not done; an order without a
  consultation has 0 steps done.
- **symptom-record completeness** (症状记录完整率) = consultations whose effective ``symptoms``
  step is ``done`` ÷ consultations. The consultations of a day are those of the store whose
  first step (earliest record) occurred that local day, so a consultation that runs past
  midnight counts on the day it began.
- **insurance pass rate** (医保核验通过率) = ``pass`` ÷ (``pass`` + ``fail``) over consultations
  with an ``insurance_check``: the effective record gives the result (``done`` with
  ``data.result``; an effective ``skipped`` check is not counted), and the check counts on the
  local day it occurred, i.e. the day of the consultation's first ``insurance_check`` record.
  A correction changes the result of the check, not its day.
- **traceability** (销售行为可追溯率) = traceable sales ÷ sales (sale receipts of the day). A sale
  is traceable when (1) it names a consultation (``consultation_id``) of its store, (2) that
  consultation's first record (the first contact) occurred at or before the sale, (3) the first
  record carries a staff id (its time is always stored), and (4) key content is recorded: the
  effective ``symptoms`` step is ``done`` with at least one non-blank keyword, or the effective
  ``recommendation`` step is ``done`` with at least one SKU.
- **prompt-answer distribution** = per SKU and prompt, the number of answers given per answer
  value and its share of the prompt's answers that day. Every ``prompt_answer`` event counts
  (an every-scan prompt answers once per scan).
- **conversion rate** (转化率) = transactions ÷ visitors; transactions = sale receipts,
  visitors = the sum of footfall ``in``.
- **average ticket** (客单价) = sales amount ÷ transactions; the sales amount is the sum of
  the receipts' reported sales (net of discounts, with or without tax by the chain's setting:
  `store_rules.sales`), returns included (they are negative), as on the store page.

A consultation's steps are read from the days asked for plus `REACH` on either side (only for
consultations that have a step in those days or that a receipt of those days names): enough
for a consultation that spans midnight or a correction made the next day. A record outside
the reach is not seen; widen ``reach`` when a later correction must be counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from ingest.models import ConsultationStep, Footfall, PromptAnswer, Receipt, ReceiptLine, Store
from ingest.timeseries import business_window
from store_rules.definitions import FlowDefinition, active_flow, flow_controlled_skus
from store_rules.flow import CONSULTATION_WINDOW, Consultation, StepRecord
from store_rules.sales import receipt_sales_sql

REACH = CONSULTATION_WINDOW  # the same window as the POS gate and the compliance check
STORE_BATCH = 500  # store ids per IN list
CENT = Decimal("0.01")
ZERO = Decimal("0.00")


class UnknownStore(LookupError):
    """A store id that is not in the master data."""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """numerator ÷ denominator; ``ratio`` is None when the denominator is 0."""

    numerator: int
    denominator: int
    ratio: float | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", self.numerator / self.denominator if self.denominator else None)

    @property
    def percent(self) -> float | None:
        return None if self.ratio is None else self.ratio * 100

    def format(self, digits: int = 1) -> str:
        """ "7 / 10 = 70.0 %", or "0 / 0 = –" when there is nothing to divide by."""
        value = "–" if self.percent is None else f"{self.percent:.{digits}f} %"
        return f"{self.numerator} / {self.denominator} = {value}"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class MoneyRatio:
    """An amount ÷ a count (average ticket); ``ratio`` is rounded to the cent, None when the count is 0."""

    numerator: Decimal
    denominator: int
    ratio: Decimal | None = field(init=False)

    def __post_init__(self) -> None:
        value = (self.numerator / self.denominator).quantize(CENT) if self.denominator else None
        object.__setattr__(self, "ratio", value)

    def format(self) -> str:
        return f"{self.numerator} / {self.denominator} = {'–' if self.ratio is None else self.ratio}"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class AnswerShare:
    answer: str
    share: Ratio  # answers with this value ÷ answers to the prompt

    @property
    def count(self) -> int:
        return self.share.numerator


@dataclass(frozen=True)
class PromptDistribution:
    """The answers to one prompt for one SKU: most frequent first, ties by answer value."""

    sku: str
    prompt_id: str
    total: int
    answers: tuple[AnswerShare, ...]

    def share(self, answer: str) -> Ratio:
        found = next((a.share for a in self.answers if a.answer == answer), None)
        return found or Ratio(0, self.total)


@dataclass(frozen=True)
class PromptAnswerDistribution:
    """Per SKU and prompt (ordered by SKU, then prompt id)."""

    prompts: tuple[PromptDistribution, ...] = ()

    def of(self, sku: str, prompt_id: str) -> PromptDistribution | None:
        return next((p for p in self.prompts if p.sku == sku and p.prompt_id == prompt_id), None)


@dataclass(frozen=True)
class DayMetrics:
    store_id: str
    day: date
    timezone: str
    step_completeness: Ratio
    symptom_completeness: Ratio
    insurance_pass_rate: Ratio
    traceability: Ratio
    conversion_rate: Ratio
    average_ticket: MoneyRatio
    prompt_answers: PromptAnswerDistribution


# --- business days -------------------------------------------------------------------------


def _merge(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _within(
    column: InstrumentedAttribute[datetime], ranges: Sequence[tuple[datetime, datetime]]
) -> ColumnElement[bool]:
    return or_(*(and_(column >= start, column < end) for start, end in ranges))


def _batches(values: Sequence[str], size: int = STORE_BATCH) -> Iterator[list[str]]:
    for index in range(0, len(values), size):
        yield list(values[index : index + size])


# --- loading -------------------------------------------------------------------------------

RECEIPTS, LINES, STEPS, ANSWERS, FOOTFALL = "receipts", "lines", "steps", "answers", "footfall"
ALL_PARTS = frozenset({RECEIPTS, LINES, STEPS, ANSWERS, FOOTFALL})


@dataclass(frozen=True)
class _Sale:
    occurred_at: datetime
    kind: str
    sales: Decimal  # reported sales (store_rules.sales)
    consultation: Consultation | None
    flow_controlled: bool


@dataclass
class _StoreDay:
    receipts: list[_Sale] = field(default_factory=list)
    visitors: int = 0
    answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    consultations: list[Consultation] = field(default_factory=list)  # first step on this day
    checks: list[Consultation] = field(default_factory=list)  # first insurance_check on this day


def money(value: Any) -> Decimal:
    # SQLite hands numbers back through floats: go through str() so 0.1 + 0.2 stays 0.30.
    return ZERO if value is None else Decimal(str(value)).quantize(CENT)


def _stores(session: Session, store_ids: Iterable[str]) -> list[Store]:
    wanted = list(dict.fromkeys(store_ids))
    found: dict[str, Store] = {}
    for batch in _batches(wanted):
        found.update((s.store_id, s) for s in session.scalars(select(Store).where(Store.store_id.in_(batch))))
    unknown = [store_id for store_id in wanted if store_id not in found]
    if unknown:
        raise UnknownStore(f"store_id: unknown store(s) {', '.join(unknown)}")
    return [found[store_id] for store_id in wanted]


def _load(
    session: Session,
    stores: Sequence[Store],
    days: Sequence[date],
    *,
    flow: FlowDefinition,
    controlled: set[str],
    reach: timedelta,
    parts: frozenset[str],
) -> dict[tuple[str, date], _StoreDay]:
    """Rows of the stores' business days, grouped by (store_id, local day); one query per table."""
    out: dict[tuple[str, date], _StoreDay] = defaultdict(_StoreDay)
    wanted_days = set(days)
    by_zone: dict[str, list[str]] = defaultdict(list)
    for store in stores:
        by_zone[store.timezone or "Asia/Shanghai"].append(store.store_id)

    for zone_name, zone_store_ids in by_zone.items():
        tz = ZoneInfo(zone_name)
        core = _merge(business_window(day, tz) for day in wanted_days)
        extended = _merge((start - reach, end + reach) for start, end in core)

        def bucket(store_id: str, at: datetime, tz: ZoneInfo = tz) -> _StoreDay | None:
            local_day = at.astimezone(tz).date()
            return out[(store_id, local_day)] if local_day in wanted_days else None

        for ids in _batches(zone_store_ids):
            consultations: dict[tuple[str, str], Consultation] = {}
            if STEPS in parts:
                consultations = _consultations(session, ids, core, extended, flow)
                for (store_id, _), consultation in consultations.items():
                    first = consultation.first_contact
                    if first is not None and (day_of_first := bucket(store_id, first.occurred_at)) is not None:
                        day_of_first.consultations.append(consultation)
                    first_check = next((r for r in consultation.records if r.step == "insurance_check"), None)
                    if (
                        first_check is not None
                        and (day_of_check := bucket(store_id, first_check.occurred_at)) is not None
                    ):
                        day_of_check.checks.append(consultation)

            if RECEIPTS in parts:
                controlled_receipts: set[tuple[str, datetime]] = set()
                if LINES in parts and controlled:
                    controlled_receipts = {
                        (event_id, occurred_at)
                        for event_id, occurred_at in session.execute(
                            select(ReceiptLine.event_id, ReceiptLine.occurred_at)
                            .where(
                                ReceiptLine.store_id.in_(ids),
                                _within(ReceiptLine.occurred_at, core),
                                ReceiptLine.kind == "sale",
                                ReceiptLine.sku.in_(sorted(controlled)),
                            )
                            .distinct()
                        )
                    }
                for store_id, event_id, occurred_at, kind, sales, consultation_id in session.execute(
                    select(
                        Receipt.store_id, Receipt.event_id, Receipt.occurred_at, Receipt.kind, receipt_sales_sql(),
                        Receipt.consultation_id,
                    ).where(Receipt.store_id.in_(ids), _within(Receipt.occurred_at, core))
                ):  # fmt: skip
                    receipt_day = bucket(store_id, occurred_at)
                    if receipt_day is None:
                        continue
                    receipt_day.receipts.append(
                        _Sale(
                            occurred_at=occurred_at,
                            kind=kind,
                            sales=money(sales),
                            consultation=consultations.get((store_id, consultation_id)) if consultation_id else None,
                            flow_controlled=(event_id, occurred_at) in controlled_receipts,
                        )
                    )

            if FOOTFALL in parts:
                for store_id, occurred_at, count_in in session.execute(
                    select(Footfall.store_id, Footfall.occurred_at, Footfall.count_in).where(
                        Footfall.store_id.in_(ids), _within(Footfall.occurred_at, core)
                    )
                ):
                    if (footfall_day := bucket(store_id, occurred_at)) is not None:
                        footfall_day.visitors += int(count_in or 0)

            if ANSWERS in parts:
                for store_id, occurred_at, sku, prompt_id, answer in session.execute(
                    select(
                        PromptAnswer.store_id, PromptAnswer.occurred_at, PromptAnswer.sku, PromptAnswer.prompt_id,
                        PromptAnswer.answer,
                    ).where(PromptAnswer.store_id.in_(ids), _within(PromptAnswer.occurred_at, core))
                ):  # fmt: skip
                    if (answer_day := bucket(store_id, occurred_at)) is not None:
                        answer_day.answers[(sku, prompt_id, answer)] += 1
    return out


def _consultations(
    session: Session,
    store_ids: list[str],
    core: list[tuple[datetime, datetime]],
    extended: list[tuple[datetime, datetime]],
    flow: FlowDefinition,
) -> dict[tuple[str, str], Consultation]:
    """Consultations with a step in the core days or named by a receipt of those days, with all
    their records within the extended window, keyed by (store_id, consultation_id)."""
    stepped = select(ConsultationStep.consultation_id).where(
        ConsultationStep.store_id.in_(store_ids), _within(ConsultationStep.occurred_at, core)
    )
    named = select(Receipt.consultation_id).where(
        Receipt.store_id.in_(store_ids), _within(Receipt.occurred_at, core), Receipt.consultation_id.is_not(None)
    )
    rows = session.execute(
        select(
            ConsultationStep.store_id, ConsultationStep.consultation_id, ConsultationStep.step,
            ConsultationStep.status, ConsultationStep.occurred_at, ConsultationStep.staff_id,
            ConsultationStep.skip_reason, ConsultationStep.data, ConsultationStep.event_id,
        )
        .where(
            ConsultationStep.store_id.in_(store_ids),
            _within(ConsultationStep.occurred_at, extended),
            or_(ConsultationStep.consultation_id.in_(stepped), ConsultationStep.consultation_id.in_(named)),
        )
        # Ties in time are broken by arrival, so a correction stamped with the same second wins.
        .order_by(ConsultationStep.occurred_at, ConsultationStep.received_at, ConsultationStep.event_id)
    )  # fmt: skip
    records: dict[tuple[str, str], list[StepRecord]] = defaultdict(list)
    for store_id, consultation_id, step, status, occurred_at, staff_id, skip_reason, data, event_id in rows:
        records[(store_id, consultation_id)].append(
            StepRecord(
                step=step, status=status, occurred_at=occurred_at, staff_id=staff_id, skip_reason=skip_reason,
                data=data, event_id=event_id,
            )
        )  # fmt: skip
    return {key: Consultation.of(flow, items) for key, items in records.items()}


# --- the metrics over one store-day --------------------------------------------------------


def _step_completeness(day: _StoreDay, flow: FlowDefinition) -> Ratio:
    required = len(flow.required_steps)
    orders = [r for r in day.receipts if r.kind == "sale" and r.flow_controlled]
    done = sum(len(r.consultation.done) for r in orders if r.consultation is not None)
    return Ratio(done, required * len(orders))


def _step_done(consultation: Consultation, step: str) -> StepRecord | None:
    record = consultation.effective.get(step)
    return record if record is not None and record.status == "done" else None


def _symptom_completeness(day: _StoreDay) -> Ratio:
    recorded = sum(1 for c in day.consultations if _step_done(c, "symptoms") is not None)
    return Ratio(recorded, len(day.consultations))


def _insurance_pass_rate(day: _StoreDay) -> Ratio:
    results: Counter[str] = Counter()
    for consultation in day.checks:
        check = _step_done(consultation, "insurance_check")
        result = (check.data or {}).get("result") if check is not None else None
        if result in ("pass", "fail"):
            results[result] += 1
    return Ratio(results["pass"], results["pass"] + results["fail"])


def _has_items(record: StepRecord | None, key: str) -> bool:
    if record is None:
        return False
    items = (record.data or {}).get(key)
    return isinstance(items, list) and any(isinstance(item, str) and item.strip() for item in items)


def is_traceable(occurred_at: datetime, consultation: Consultation | None) -> bool:
    """Traceability of one sale at ``occurred_at`` (see the module docstring)."""
    if consultation is None:
        return False
    first = consultation.first_contact
    if first is None or first.occurred_at > occurred_at or not (first.staff_id or "").strip():
        return False
    return _has_items(_step_done(consultation, "symptoms"), "keywords") or _has_items(
        _step_done(consultation, "recommendation"), "skus"
    )


def _traceability(day: _StoreDay) -> Ratio:
    sales = [r for r in day.receipts if r.kind == "sale"]
    return Ratio(sum(1 for r in sales if is_traceable(r.occurred_at, r.consultation)), len(sales))


def _conversion_rate(day: _StoreDay) -> Ratio:
    return Ratio(sum(1 for r in day.receipts if r.kind == "sale"), day.visitors)


def _average_ticket(day: _StoreDay) -> MoneyRatio:
    amount = sum((r.sales for r in day.receipts), ZERO)
    return MoneyRatio(amount, sum(1 for r in day.receipts if r.kind == "sale"))


def _prompt_answers(day: _StoreDay) -> PromptAnswerDistribution:
    grouped: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for (sku, prompt_id, answer), count in day.answers.items():
        grouped[(sku, prompt_id)][answer] += count
    prompts = []
    for (sku, prompt_id), counts in sorted(grouped.items()):
        total = sum(counts.values())
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        prompts.append(
            PromptDistribution(
                sku=sku,
                prompt_id=prompt_id,
                total=total,
                answers=tuple(AnswerShare(answer, Ratio(count, total)) for answer, count in ordered),
            )
        )
    return PromptAnswerDistribution(tuple(prompts))


# --- service functions ---------------------------------------------------------------------


def _one_day(session: Session, store_id: str, day: date, parts: frozenset[str]) -> tuple[_StoreDay, FlowDefinition]:
    (store,) = _stores(session, [store_id])
    flow = active_flow(session=session)
    controlled = flow_controlled_skus(session=session, flow=flow) if LINES in parts else set()
    loaded = _load(session, [store], [day], flow=flow, controlled=controlled, reach=REACH, parts=parts)
    return loaded.get((store_id, day)) or _StoreDay(), flow


def step_completeness(*, session: Session, store_id: str, day: date) -> Ratio:
    """Steps done ÷ steps required over the day's flow-controlled orders."""
    loaded, flow = _one_day(session, store_id, day, frozenset({RECEIPTS, LINES, STEPS}))
    return _step_completeness(loaded, flow)


def symptom_completeness(*, session: Session, store_id: str, day: date) -> Ratio:
    """Consultations begun that day with ``symptoms`` done ÷ consultations begun that day."""
    loaded, _ = _one_day(session, store_id, day, frozenset({STEPS}))
    return _symptom_completeness(loaded)


def insurance_pass_rate(*, session: Session, store_id: str, day: date) -> Ratio:
    """pass ÷ (pass + fail) of the effective insurance checks made that day."""
    loaded, _ = _one_day(session, store_id, day, frozenset({STEPS}))
    return _insurance_pass_rate(loaded)


def traceability(*, session: Session, store_id: str, day: date) -> Ratio:
    """Sales traceable to a first contact (time, staff) and key content ÷ sales.

    Traceable: the sale's consultation has its first record at or before the sale, that record
    names a staff member, and the effective ``symptoms`` step is done with at least one keyword
    or the effective ``recommendation`` step is done with at least one SKU.
    """
    loaded, _ = _one_day(session, store_id, day, frozenset({RECEIPTS, STEPS}))
    return _traceability(loaded)


def prompt_answer_distribution(*, session: Session, store_id: str, day: date) -> PromptAnswerDistribution:
    """Answers per SKU and prompt, with each answer's count and share."""
    loaded, _ = _one_day(session, store_id, day, frozenset({ANSWERS}))
    return _prompt_answers(loaded)


def conversion_rate(*, session: Session, store_id: str, day: date) -> Ratio:
    """Transactions (sale receipts) ÷ visitors (footfall ``in``)."""
    loaded, _ = _one_day(session, store_id, day, frozenset({RECEIPTS, FOOTFALL}))
    return _conversion_rate(loaded)


def average_ticket(*, session: Session, store_id: str, day: date) -> MoneyRatio:
    """Sales amount (reported sales of the receipts, returns included) ÷ transactions (sale receipts)."""
    loaded, _ = _one_day(session, store_id, day, frozenset({RECEIPTS}))
    return _average_ticket(loaded)


def _metrics(store: Store, day: date, loaded: _StoreDay, flow: FlowDefinition) -> DayMetrics:
    return DayMetrics(
        store_id=store.store_id,
        day=day,
        timezone=store.timezone,
        step_completeness=_step_completeness(loaded, flow),
        symptom_completeness=_symptom_completeness(loaded),
        insurance_pass_rate=_insurance_pass_rate(loaded),
        traceability=_traceability(loaded),
        conversion_rate=_conversion_rate(loaded),
        average_ticket=_average_ticket(loaded),
        prompt_answers=_prompt_answers(loaded),
    )


def store_days(
    *, session: Session, store_ids: Iterable[str], days: Iterable[date], reach: timedelta = REACH
) -> dict[tuple[str, date], DayMetrics]:
    """All metrics of many store-days, keyed by (store_id, day) in the order of stores, then days.

    Each table is read once per time zone (and per batch of stores) for the whole set of days;
    a store-day without data has 0 / 0 ratios.
    """
    stores = _stores(session, store_ids)
    wanted = sorted(set(days))
    if not stores or not wanted:
        return {}
    flow = active_flow(session=session)
    controlled = flow_controlled_skus(session=session, flow=flow)
    loaded = _load(session, stores, wanted, flow=flow, controlled=controlled, reach=reach, parts=ALL_PARTS)
    empty = _StoreDay()
    return {
        (store.store_id, day): _metrics(store, day, loaded.get((store.store_id, day), empty), flow)
        for store in stores
        for day in wanted
    }


def day_metrics(*, session: Session, store_id: str, day: date) -> DayMetrics:
    """All metrics of one store's business day."""
    return store_days(session=session, store_ids=[store_id], days=[day])[(store_id, day)]


# --- by staff member -------------------------------------------------------------------------


@dataclass(frozen=True)
class StaffCompliance:
    """The counter flow of the consultations one staff member started on a business day."""

    staff_id: str | None
    consultations: int
    steps: Ratio  # steps done ÷ steps required, over those consultations
    symptoms: Ratio  # consultations with symptoms recorded ÷ consultations
    skipped: int  # steps skipped with a reason
    insurance: Ratio  # pass ÷ (pass + fail) of their checks


def staff_compliance(*, session: Session, store_id: str, day: date) -> list[StaffCompliance]:
    """Per staff member of the first contact, most consultations first; consultations as in the store metrics."""
    loaded, flow = _one_day(session, store_id, day, frozenset({STEPS}))
    required = len(flow.required_steps)
    grouped: dict[str | None, list[Consultation]] = {}
    for consultation in loaded.consultations:
        first = consultation.first_contact
        grouped.setdefault(first.staff_id if first else None, []).append(consultation)
    rows = []
    for staff_id, consultations in grouped.items():
        recorded = sum(1 for c in consultations if _step_done(c, "symptoms") is not None)
        results = Counter(
            (check.data or {}).get("result")
            for c in consultations
            if (check := _step_done(c, "insurance_check")) is not None
        )
        rows.append(
            StaffCompliance(
                staff_id=staff_id,
                consultations=len(consultations),
                steps=Ratio(sum(len(c.done) for c in consultations), required * len(consultations)),
                symptoms=Ratio(recorded, len(consultations)),
                skipped=sum(len(c.skipped) for c in consultations),
                insurance=Ratio(results["pass"], results["pass"] + results["fail"]),
            )
        )
    return sorted(rows, key=lambda r: (-r.consultations, r.staff_id or ""))
