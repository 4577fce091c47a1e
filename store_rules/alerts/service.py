"""Rule evaluation and the alert lifecycle, as plain functions taking a session.

The scheduler, the API, the CLI and back-testing call the same code. Evaluating a rule reads
each store's metric series up to the close of one business day (in the store's time zone),
runs the pure rule (store_rules.alerts.rules) and hands each verdict to a sink: the database
(live) or memory (back-testing). Raising is idempotent twice over: an alert's dedup key is
(rule, store, subject, first day of the window), and no new alert is raised while one of the
same rule and store is unresolved, so one episode is one alert.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ingest import audit
from ingest.models import ConsultationStep, Footfall, Receipt, Region, Sensor, Staff, StockSnapshot, Store
from ingest.settings import get_settings
from ingest.timeseries import business_window
from store_rules.alerts.definitions import (
    LEVEL_ROLE,
    NEXT_LEVEL,
    AnyRule,
    ChannelSet,
    DraftParams,
    SilenceRule,
    ThresholdStreakRule,
    active_channels,
    stored_rule,
)
from store_rules.alerts.models import (
    ACKNOWLEDGED,
    OPEN,
    PENDING,
    RESOLVED,
    Alert,
    AlertTransition,
    Notification,
)
from store_rules.alerts.rules import MetricRule, Verdict, metric_rule_for, silence_rule_for, stock_rule_for
from store_rules.definitions import active_flow
from store_rules.flow import Consultation, StepRecord
from store_rules.metrics import Ratio, store_days
from store_rules.privacy import masked_evidence as masked_evidence  # delivery and callers use it from here
from store_rules.promotion_events import PromotionDecided, on_promotion_decided
from store_rules.promotions import service as promotions
from store_rules.promotions.models import Promotion
from store_rules.promotions.templates import stored_template
from store_rules.stock import close_of, positions

log = logging.getLogger(__name__)
SYSTEM = "system"
ACK_WINDOW = timedelta(hours=24)

METRIC_NAMES: dict[str, tuple[str, str]] = {
    "insurance_pass_rate": ("医保核验通过率", "insurance pass rate"),
    "step_completeness": ("过程数据完整率", "step completeness"),
    "symptom_completeness": ("症状记录完整率", "symptom-record completeness"),
    "traceability": ("销售行为可追溯率", "traceability"),
    "conversion_rate": ("转化率", "conversion rate"),
}
SOURCE_NAMES: dict[str, tuple[str, str]] = {
    "footfall": ("客流数据", "footfall"),
    "receipts": ("销售小票", "receipts"),
    "consultation_steps": ("问诊记录", "consultation steps"),
    "stock": ("库存数据", "stock snapshots"),
}


class AlertError(ValueError):
    """A lifecycle request that cannot be carried out; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


# --- what a verdict becomes --------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An alert a rule wants raised, before it meets the dedup key and the open-alert guard."""

    rule: AnyRule
    store_id: str
    region_id: str
    store_name: dict[str, str]
    day: date
    verdict: Verdict
    summary: dict[str, str]
    evidence: list[dict[str, Any]]

    @property
    def dedup_key(self) -> str:
        start = self.verdict.window_start.isoformat() if self.verdict.window_start else ""
        return f"{self.rule.id}|{self.store_id}|{self.verdict.subject or ''}|{start}"


class AlertSink(Protocol):
    def unresolved(self, rule: AnyRule, store_id: str, subject: str | None) -> bool: ...

    def raise_alert(self, candidate: Candidate) -> bool: ...

    def clear(self, rule: AnyRule, store_id: str, subject: str | None, day: date) -> int: ...


@dataclass
class EvaluationReport:
    rule_id: str
    evaluated: int = 0  # store-days (and subjects) looked at
    raised: list[str] = field(default_factory=list)  # dedup keys
    resolved: int = 0


# --- reading the data ---------------------------------------------------------------------


def scope_stores(*, session: Session, rule: AnyRule, store_ids: Iterable[str] | None = None) -> list[Store]:
    query = select(Store).where(Store.active.is_(True)).order_by(Store.store_id)
    if rule.scope.regions:
        query = query.where(Store.region_id.in_(rule.scope.regions))
    elif rule.scope.stores:
        query = query.where(Store.store_id.in_(rule.scope.stores))
    if store_ids is not None:
        query = query.where(Store.store_id.in_(list(store_ids)))
    return list(session.scalars(query))


def last_closed_day(store: Store, now: datetime) -> date:
    """The store's most recent business day that has ended (yesterday, local time)."""
    return now.astimezone(ZoneInfo(store.timezone)).date() - timedelta(days=1)


class MetricSource:
    """Daily metric ratios per store, loaded once per (store, day) and kept for the source's life."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._days: dict[tuple[str, date], Any] = {}

    def preload(self, store_ids: Sequence[str], first: date, last: date) -> None:
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        missing_days = [d for d in days if any((s, d) not in self._days for s in store_ids)]
        if missing_days and store_ids:
            self._days.update(store_days(session=self.session, store_ids=store_ids, days=missing_days))

    def series(self, store_id: str, metric: str, first: date, last: date) -> dict[date, Ratio]:
        self.preload([store_id], first, last)
        out: dict[date, Ratio] = {}
        current = first
        while current <= last:
            metrics = self._days.get((store_id, current))
            if metrics is not None:
                out[current] = getattr(metrics, metric)
            current += timedelta(days=1)
        return out


_SILENCE_TABLES: dict[str, Any] = {
    "footfall": Footfall,
    "receipts": Receipt,
    "consultation_steps": ConsultationStep,
    "stock": StockSnapshot,
}


def last_seen(*, session: Session, rule: SilenceRule, store: Store, day: date) -> dict[str | None, date | None]:
    """Subject → the last local day with a record, looking back from the close of `day`."""
    tz = ZoneInfo(store.timezone)
    params = rule.params
    start, _ = business_window(day - timedelta(days=params.lookback_days - 1), tz)
    _, end = business_window(day, tz)
    table = _SILENCE_TABLES[params.source]
    conditions = (table.store_id == store.store_id, table.occurred_at >= start, table.occurred_at < end)
    if params.per == "sensor":
        sensors = session.scalars(select(Sensor.sensor_id).where(Sensor.store_id == store.store_id)).all()
        rows = session.execute(
            select(Footfall.sensor_id, func.max(Footfall.occurred_at)).where(*conditions).group_by(Footfall.sensor_id)
        ).all()
        seen: dict[str | None, date | None] = {sensor: None for sensor in sensors}
        for sensor, at in rows:
            seen[sensor] = at.astimezone(tz).date()
        return seen
    latest = session.scalar(select(func.max(table.occurred_at)).where(*conditions))
    return {None: latest.astimezone(tz).date() if latest else None}


def never_reported(
    *, session: Session, store: Store, sensor_ids: Sequence[str], before: datetime
) -> dict[str, datetime | None]:
    """Of `sensor_ids`, the store's counters without a single footfall record before `before` → when registered."""
    if not sensor_ids:
        return {}
    reported = (
        select(Footfall.sensor_id)
        .where(
            Footfall.store_id == store.store_id,
            Footfall.sensor_id == Sensor.sensor_id,
            Footfall.occurred_at < before,
        )
        .exists()
    )
    rows = session.execute(
        select(Sensor.sensor_id, Sensor.registered_at).where(
            Sensor.store_id == store.store_id, Sensor.sensor_id.in_(list(sensor_ids)), ~reported
        )
    ).all()
    return {sensor: registered for sensor, registered in rows}


def failed_insurance_checks(*, session: Session, store: Store, first: date, last: date) -> list[dict[str, Any]]:
    """The insurance checks of the days [first, last] whose effective result is `fail`, oldest first.

    Each holds the time (local), staff, customer, the consultation's symptom keywords and the reason.
    """
    tz = ZoneInfo(store.timezone)
    start, _ = business_window(first, tz)
    _, end = business_window(last, tz)
    consultation_ids = session.scalars(
        select(ConsultationStep.consultation_id).where(
            ConsultationStep.store_id == store.store_id,
            ConsultationStep.step == "insurance_check",
            ConsultationStep.occurred_at >= start,
            ConsultationStep.occurred_at < end,
        )
    ).all()
    if not consultation_ids:
        return []
    rows = session.scalars(
        select(ConsultationStep).where(
            ConsultationStep.store_id == store.store_id,
            ConsultationStep.consultation_id.in_(set(consultation_ids)),
            ConsultationStep.occurred_at >= start - timedelta(days=1),
            ConsultationStep.occurred_at < end,
        )
    ).all()
    by_consultation: dict[str, list[ConsultationStep]] = defaultdict(list)
    for row in rows:
        by_consultation[row.consultation_id].append(row)
    staff_names = dict(
        session.execute(select(Staff.staff_id, Staff.name).where(Staff.store_id == store.store_id)).all()
    )
    flow = active_flow(session=session)
    failed = []
    for consultation_id, steps in by_consultation.items():
        records = [
            StepRecord(s.step, s.status, s.occurred_at, s.staff_id, s.skip_reason, s.data, s.event_id) for s in steps
        ]
        consultation = Consultation.of(flow, records)
        check = consultation.effective.get("insurance_check")
        first_check = min((s for s in steps if s.step == "insurance_check"), key=lambda s: s.occurred_at, default=None)
        if check is None or first_check is None or not (start <= first_check.occurred_at < end):
            continue
        if check.status != "done" or (check.data or {}).get("result") != "fail":
            continue
        symptoms = consultation.effective.get("symptoms")
        keywords = list((symptoms.data or {}).get("keywords") or []) if symptoms and symptoms.status == "done" else []
        customer = next((s for s in sorted(steps, key=lambda s: s.occurred_at) if s.customer_name or s.member_id), None)
        failed.append(
            {
                "time": check.occurred_at.astimezone(tz).isoformat(timespec="seconds"),
                "consultation_id": consultation_id,
                "staff_id": check.staff_id,
                "staff_name": staff_names.get(check.staff_id or ""),
                "customer_name": customer.customer_name if customer else None,
                "member_id": customer.member_id if customer else None,
                "symptom_keywords": keywords,
                "reason": (check.data or {}).get("reason"),
            }
        )
    failed.sort(key=lambda item: (item["time"], item["consultation_id"]))
    return failed


# --- the texts ----------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:g}"


def _stock_watch_summary(store: dict[str, str], v: dict[str, Any]) -> dict[str, str]:
    name = v["sku_name"]
    first, last = (date.fromisoformat(d) for d in v["last_window"])
    days = (last - first).days + 1
    growth = v["growth_percent"]
    sales_zh = f"近 {days} 天销量 {_num(v['sales_last'])}（此前 {days} 天 {_num(v['sales_previous'])}，+{growth}%）"
    return {
        "zh-CN": f"{store['zh-CN']} {name['zh-CN']} 库存 {_num(v['on_hand'])} 低于安全库存 {_num(v['safety_stock'])}，"
        f"{sales_zh}：已生成促销草稿，待店长审批",
        "en": f"{store['en']}: {name['en']} on hand {_num(v['on_hand'])} below safety stock {_num(v['safety_stock'])}, "
        f"sales of the last {days} days {_num(v['sales_last'])} vs {_num(v['sales_previous'])} "
        f"(+{v['growth_percent']} %): promotion drafted for the manager's approval",
    }


def _expiry_summary(store: dict[str, str], v: dict[str, Any]) -> dict[str, str]:
    name, lots = v["sku_name"], len(v["lots"])
    soonest = min((lot["expires_on"] for lot in v["lots"]), default="—")
    return {
        "zh-CN": f"{store['zh-CN']} {name['zh-CN']} {lots} 个批次共 {_num(v['units_at_risk'])} 件"
        f"将在 {v['window_days']} 天内到期（最早 {soonest}）：已生成临期促销草稿，待店长审批",
        "en": f"{store['en']}: {name['en']} {_num(v['units_at_risk'])} units in {lots} lot(s) expire within "
        f"{v['window_days']} days (first {soonest}): near-expiry promotion drafted for the manager's approval",
    }


def _stockout_summary(store: dict[str, str], v: dict[str, Any]) -> dict[str, str]:
    name = v["sku_name"]
    return {
        "zh-CN": f"{store['zh-CN']} {name['zh-CN']} 库存 {_num(v['on_hand'])} 仅够 {v['days_of_cover']} 天"
        f"（日均销量 {v['average_daily_sales']}），低于补货周期 {v['lead_time_days']} 天：请尽快补货",
        "en": f"{store['en']}: {name['en']} on hand {_num(v['on_hand'])} covers {v['days_of_cover']} days "
        f"({v['average_daily_sales']} a day), less than the {v['lead_time_days']}-day lead time: reorder now",
    }


STOCK_SUMMARIES = {
    "stock_watch": _stock_watch_summary,
    "expiry_watch": _expiry_summary,
    "stockout_forecast": _stockout_summary,
}


def _summary(rule: AnyRule, store_name: dict[str, str], verdict: Verdict) -> dict[str, str]:
    values = verdict.values
    if rule.type == "threshold_streak":
        zh, en = METRIC_NAMES[values["metric"]]
        # A day without cases has no value: shown as "–", not as a number.
        shown_zh = "、".join("–" if d["percent"] is None else f"{d['percent']}%" for d in values["days"])
        shown_en = ", ".join("–" if d["percent"] is None else f"{d['percent']} %" for d in values["days"])
        side_zh = "低于" if values["direction"] == "below" else "高于"
        threshold = values["threshold_percent"]
        return {
            "zh-CN": f"{store_name['zh-CN']} {zh}连续 {values['streak_days']} 天{side_zh} {threshold:g}%（{shown_zh}）",
            "en": f"{store_name['en']}: {en} {values['direction']} {threshold:g} % for {values['streak_days']} "
            f"business days in a row ({shown_en})",
        }
    if rule.type == "change":
        zh, en = METRIC_NAMES[values["metric"]]
        before, now, change = values["previous"]["percent"], values["current"]["percent"], values["change_percent"]
        return {
            "zh-CN": f"{store_name['zh-CN']} {zh} {before}% → {now}%（{change:+g}%）",
            "en": f"{store_name['en']}: {en} {before} % → {now} % ({change:+g} %)",
        }
    if rule.type in STOCK_SUMMARIES:
        return STOCK_SUMMARIES[rule.type](store_name, values)
    zh, en = SOURCE_NAMES[values["source"]]
    if "never_reported" in values:
        counters = values["never_reported"]
        since = values["registered_on"] or "—"
        en = "counter {} never reported since it was registered" if len(counters) == 1 else (
            "counters {} never reported since they were registered")  # fmt: skip
        return {
            "zh-CN": f"{store_name['zh-CN']} 客流计 {'、'.join(counters)} 自登记（{since}）以来从未上报数据",
            "en": f"{store_name['en']}: footfall {en.format(', '.join(counters))} ({since})",
        }
    subject = f" {verdict.subject}" if verdict.subject else ""
    seen = values["last_seen"] or "—"
    return {
        "zh-CN": f"{store_name['zh-CN']}{subject} 已连续 {values['silent_days']} 天没有{zh}（最后一次：{seen}）",
        "en": f"{store_name['en']}{subject}: no {en} for {values['silent_days']} days (last: {seen})",
    }


# --- evaluation ---------------------------------------------------------------------------


def _candidates_for_store(
    session: Session,
    rule: AnyRule,
    store: Store,
    day: date,
    source: MetricSource,
    as_of: datetime | None,
    counter_grace: timedelta,
) -> list[Candidate]:
    names = {"zh-CN": store.name_zh, "en": store.name_en}
    verdicts: list[Verdict]
    metric_rule: MetricRule | None = metric_rule_for(rule)
    stock_rule = stock_rule_for(rule)
    if stock_rule is not None:
        tz = ZoneInfo(store.timezone)
        moment = as_of or close_of(day, tz)
        first = day - timedelta(days=stock_rule.sales_days - 1) if stock_rule.sales_days else None
        found = positions(
            session=session, store=store, as_of=moment, sales_first=first, sales_last=day if first else None
        )
        verdicts = stock_rule.evaluate(found, day, moment.astimezone(tz).date())
    elif metric_rule is not None:
        metric = rule.params.metric  # type: ignore[union-attr]
        first = day - timedelta(days=metric_rule.lookback_days)
        verdicts = metric_rule.evaluate(source.series(store.store_id, metric, first, day), day)
    else:
        silence = silence_rule_for(rule)
        assert silence is not None and isinstance(rule, SilenceRule)
        seen = last_seen(session=session, rule=rule, store=store, day=day)
        overdue: dict[str, date | None] | None = None
        if rule.params.per == "sensor":
            tz = ZoneInfo(store.timezone)
            _, end = business_window(day, tz)
            silent = [sensor for sensor, at in seen.items() if at is None and sensor is not None]
            unreported = never_reported(session=session, store=store, sensor_ids=silent, before=end)
            moment = as_of or close_of(day, tz)
            overdue = {}
            for sensor, registered_at in unreported.items():
                del seen[sensor]
                if registered_at is None or registered_at + counter_grace <= moment:
                    overdue[sensor] = registered_at.astimezone(tz).date() if registered_at else None
        verdicts = silence.evaluate(seen, day, overdue)
    out = []
    for verdict in verdicts:
        out.append(
            Candidate(
                rule=rule, store_id=store.store_id, region_id=store.region_id, store_name=names, day=day,
                verdict=verdict, summary=_summary(rule, names, verdict) if verdict.fired else {}, evidence=[],
            )
        )  # fmt: skip
    return out


def _with_evidence(session: Session, candidate: Candidate, store: Store) -> Candidate:
    rule = candidate.rule
    if not isinstance(rule, ThresholdStreakRule) or rule.params.evidence != "failed_insurance_checks":
        return candidate
    first = candidate.day - timedelta(days=rule.params.evidence_days - 1)
    evidence = failed_insurance_checks(session=session, store=store, first=first, last=candidate.day)
    return replace(candidate, evidence=evidence)


def evaluate_day(
    *,
    session: Session,
    rule: AnyRule,
    stores: Sequence[Store],
    day: date,
    sink: AlertSink,
    source: MetricSource,
    as_of: datetime | None = None,
    counter_grace: timedelta | None = None,
) -> EvaluationReport:
    """One rule at the close of one business day, for the given stores.

    Stock rules read the stock as of `as_of` (live: now) or else as of the close of the day, and
    so do silence rules judge a counter that never reported against its grace period
    (`counter_grace`, by default the setting counter_grace_hours).
    """
    grace = counter_grace if counter_grace is not None else timedelta(hours=get_settings().counter_grace_hours)
    report = EvaluationReport(rule.id)
    for store in stores:
        for candidate in _candidates_for_store(session, rule, store, day, source, as_of, grace):
            report.evaluated += 1
            verdict = candidate.verdict
            if verdict.cleared:
                report.resolved += sink.clear(rule, store.store_id, verdict.subject, day)
            if not verdict.fired or sink.unresolved(rule, store.store_id, verdict.subject):
                continue
            if sink.raise_alert(_with_evidence(session, candidate, store)):
                report.raised.append(candidate.dedup_key)
    return report


def evaluate_rule(
    *,
    session: Session,
    rule: AnyRule,
    now: datetime | None = None,
    day: date | None = None,
    store_ids: Iterable[str] | None = None,
    channels: ChannelSet | None = None,
    source: MetricSource | None = None,
    counter_grace: timedelta | None = None,
) -> EvaluationReport:
    """Evaluate a rule live: each store at the close of its last business day (or of `day`).

    Pass a `source` preloaded over many days to evaluate day after day without reading a day twice.
    """
    now = now or datetime.now(UTC)
    sink = DatabaseSink(session, channels if channels is not None else active_channels(session=session), now)
    source = source or MetricSource(session)
    by_day: dict[date, list[Store]] = defaultdict(list)
    for store in scope_stores(session=session, rule=rule, store_ids=store_ids):
        by_day[day or last_closed_day(store, now)].append(store)
    total = EvaluationReport(rule.id)
    metric_rule = metric_rule_for(rule)
    for when, stores in sorted(by_day.items()):
        if metric_rule is not None:
            source.preload([s.store_id for s in stores], when - timedelta(days=metric_rule.lookback_days), when)
        report = evaluate_day(
            session=session, rule=rule, stores=stores, day=when, sink=sink, source=source,
            as_of=now if day is None else None, counter_grace=counter_grace,
        )  # fmt: skip
        total.evaluated += report.evaluated
        total.raised += report.raised
        total.resolved += report.resolved
    if total.raised or total.resolved:
        log.info("rule %s: %d alert(s) raised, %d resolved", rule.id, len(total.raised), total.resolved)
    return total


# --- the database sink ---------------------------------------------------------------------


def _insert(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _transition(
    session: Session,
    alert_id: int,
    action: str,
    before: str | None,
    after: str,
    actor: str,
    at: datetime,
    note: str | None,
) -> None:
    session.add(
        AlertTransition(
            alert_id=alert_id, at=at, action=action, from_status=before, to_status=after, actor=actor, note=note
        )
    )


def _queue_notifications(session: Session, alert: Alert, channels: ChannelSet, reason: str, now: datetime) -> int:
    routed = channels.routed(level=alert.level, store_id=alert.store_id, region_id=alert.region_id)
    for channel in routed:
        statement = (
            _insert(session)(Notification)
            .values(
                alert_id=alert.id, channel_id=channel.id, reason=reason, status=PENDING, attempts=0,
                next_attempt_at=now, created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["alert_id", "channel_id", "reason"])
        )  # fmt: skip
        session.execute(statement)
    if not routed:
        log.warning("alert %s (%s, level %s): no channel reaches it", alert.id, alert.store_id, alert.level)
    return len(routed)


class DatabaseSink:
    def __init__(self, session: Session, channels: ChannelSet, now: datetime) -> None:
        self.session, self.channels, self.now = session, channels, now

    def unresolved(self, rule: AnyRule, store_id: str, subject: str | None) -> bool:
        if isinstance(rule.params, DraftParams) and subject is not None:
            # A drafting rule is held back by the promotion itself: pending, active or lately refused.
            return promotions.blocks_new_draft(
                session=self.session, store_id=store_id, sku=subject, template_id=rule.params.template,
                cooldown_days=rule.params.cooldown_days, now=self.now,
            )  # fmt: skip
        query = select(Alert.id).where(Alert.rule_id == rule.id, Alert.store_id == store_id, Alert.status != RESOLVED)
        query = query.where(Alert.subject.is_(None) if subject is None else Alert.subject == subject)
        return self.session.scalar(query.limit(1)) is not None

    def _draft(self, candidate: Candidate) -> Promotion | bool | None:
        """The draft a drafting rule makes with its alert; True for rules that draft nothing."""
        rule, verdict = candidate.rule, candidate.verdict
        if not isinstance(rule.params, DraftParams) or verdict.subject is None:
            return True
        template = stored_template(session=self.session, template_id=rule.params.template)
        if template is None:
            log.error("rule %s: promotion template %r is not loaded; nothing drafted", rule.id, rule.params.template)
            return None
        store = self.session.get(Store, candidate.store_id)
        assert store is not None
        at_risk = verdict.values.get("units_at_risk")
        return promotions.draft(
            session=self.session, store=store, sku=verdict.subject, template=template, evidence=verdict.values,
            now=self.now, rule_id=rule.id, limit_units=Decimal(str(at_risk)) if at_risk is not None else None,
        )  # fmt: skip

    def raise_alert(self, candidate: Candidate) -> bool:
        # The draft and its alert stand or fall together: when another evaluation (or an earlier
        # one, for the same window) already raised the alert, the draft made for it is undone.
        savepoint = self.session.begin_nested()
        if self._raise(candidate):
            savepoint.commit()
            return True
        savepoint.rollback()
        return False

    def _raise(self, candidate: Candidate) -> bool:
        rule, verdict = candidate.rule, candidate.verdict
        assert verdict.window_start is not None and verdict.window_end is not None
        drafted = self._draft(candidate)
        if drafted is None:
            return False
        statement = (
            _insert(self.session)(Alert)
            .values(
                dedup_key=candidate.dedup_key, rule_id=rule.id, rule_version=rule.version, rule_type=rule.type,
                severity=rule.severity, store_id=candidate.store_id, region_id=candidate.region_id,
                subject=verdict.subject, window_start=verdict.window_start, window_end=verdict.window_end,
                status=OPEN, level=rule.route.level, role=rule.route.role, summary=candidate.summary,
                values=verdict.values, evidence=candidate.evidence, raised_at=self.now,
            )
            .on_conflict_do_nothing(index_elements=["dedup_key"])
            .returning(Alert.id)
        )  # fmt: skip
        alert_id = self.session.scalar(statement)
        if alert_id is None:
            return False
        if isinstance(drafted, Promotion):
            promotions.link_alert(session=self.session, promotion=drafted, alert_id=alert_id)
        _transition(self.session, alert_id, "raised", None, OPEN, SYSTEM, self.now, candidate.summary.get("en"))
        alert = self.session.get(Alert, alert_id)
        assert alert is not None
        _queue_notifications(self.session, alert, self.channels, "raised", self.now)
        return True

    def clear(self, rule: AnyRule, store_id: str, subject: str | None, day: date) -> int:
        query = select(Alert).where(Alert.rule_id == rule.id, Alert.store_id == store_id, Alert.status != RESOLVED)
        query = query.where(Alert.subject.is_(None) if subject is None else Alert.subject == subject)
        resolved = 0
        for alert in self.session.scalars(query):
            if _resolve(self.session, alert, SYSTEM, f"condition clear on {day.isoformat()}", self.now):
                resolved += 1
        return resolved


# --- lifecycle -----------------------------------------------------------------------------


def _resolve(session: Session, alert: Alert, actor: str, note: str | None, now: datetime) -> bool:
    before = alert.status
    # Conditional: an alert resolved concurrently (another worker, a supervisor) stays as it is.
    result = session.execute(
        update(Alert)
        .where(Alert.id == alert.id, Alert.status != RESOLVED)
        .values(status=RESOLVED, resolved_at=now, resolved_by=actor)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    _transition(session, alert.id, "resolved", before, RESOLVED, actor, now, note)
    session.refresh(alert)
    return True


def resolve_by_system(*, session: Session, alert_id: int, note: str, now: datetime) -> bool:
    """Resolve an alert whose cause went away (e.g. its promotion draft was decided); False if already resolved."""
    alert = session.get(Alert, alert_id)
    return alert is not None and _resolve(session, alert, SYSTEM, note, now)


def close_drafting_alert(session: Session, event: PromotionDecided) -> None:
    """A draft was approved, rejected or expired: the alert that made it has been answered."""
    if event.alert_id is not None:
        resolve_by_system(session=session, alert_id=event.alert_id, note=event.note, now=event.at)


# The promotion side emits its decisions; this side answers them (promotions never import alerts).
on_promotion_decided("alerts.close_drafting_alert", close_drafting_alert)


def get_alert(*, session: Session, alert_id: int) -> Alert:
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise AlertError(f"alert_id: no alert {alert_id}", 404)
    return alert


def acknowledge(
    *, session: Session, alert_id: int, user_id: str, note: str | None = None, now: datetime | None = None
) -> Alert:
    now = now or datetime.now(UTC)
    alert = get_alert(session=session, alert_id=alert_id)
    result = session.execute(
        update(Alert)
        .where(Alert.id == alert_id, Alert.status == OPEN)
        .values(status=ACKNOWLEDGED, acknowledged_at=now, acknowledged_by=user_id)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.refresh(alert)
        raise AlertError(f"status: alert {alert_id} is {alert.status}, only an open alert can be acknowledged")
    _transition(session, alert_id, "acknowledged", OPEN, ACKNOWLEDGED, user_id, now, note)
    audit.record(session=session, actor=user_id, action="alert_acknowledged", target=str(alert_id), at=now,
                 detail={"store_id": alert.store_id, "rule_id": alert.rule_id, "note": note})  # fmt: skip
    session.refresh(alert)
    return alert


def resolve(
    *, session: Session, alert_id: int, user_id: str, note: str | None = None, now: datetime | None = None
) -> Alert:
    alert = get_alert(session=session, alert_id=alert_id)
    if not _resolve(session, alert, user_id, note, now or datetime.now(UTC)):
        raise AlertError(f"status: alert {alert_id} is already resolved")
    audit.record(session=session, actor=user_id, action="alert_resolved", target=str(alert_id),
                 detail={"store_id": alert.store_id, "rule_id": alert.rule_id, "note": note})  # fmt: skip
    return alert


def transitions(*, session: Session, alert_id: int) -> list[AlertTransition]:
    return list(
        session.scalars(
            select(AlertTransition).where(AlertTransition.alert_id == alert_id).order_by(AlertTransition.id)
        )
    )


def escalate_due(*, session: Session, now: datetime | None = None, channels: ChannelSet | None = None) -> list[int]:
    """Move open alerts nobody acknowledged in time to the next level, and notify that level."""
    now = now or datetime.now(UTC)
    channels = channels if channels is not None else active_channels(session=session)
    escalated = []
    rules: dict[str, AnyRule | None] = {}
    candidates = session.scalars(
        select(Alert).where(Alert.status == OPEN, Alert.escalated_at.is_(None), Alert.level.in_(list(NEXT_LEVEL)))
    ).all()
    for alert in candidates:
        if alert.rule_id not in rules:
            rules[alert.rule_id] = stored_rule(session=session, rule_id=alert.rule_id)
        rule = rules[alert.rule_id]
        hours = rule.route.escalate_after_hours if rule else None
        if hours is None or alert.raised_at + timedelta(hours=hours) > now:
            continue
        level = NEXT_LEVEL[alert.level]
        result = session.execute(
            update(Alert)
            .where(Alert.id == alert.id, Alert.status == OPEN, Alert.escalated_at.is_(None))
            .values(level=level, role=LEVEL_ROLE[level], escalated_at=now)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            continue
        session.refresh(alert)
        _transition(session, alert.id, "escalated", OPEN, OPEN, SYSTEM, now, f"not acknowledged within {hours:g} h")
        _queue_notifications(session, alert, channels, "escalated", now)
        escalated.append(alert.id)
    return escalated


def list_alerts(
    *,
    session: Session,
    status: str | None = None,
    store_ids: Iterable[str] | None = None,
    region_id: str | None = None,
    limit: int = 200,
) -> list[Alert]:
    query = select(Alert).order_by(Alert.raised_at.desc(), Alert.id.desc()).limit(limit)
    if status:
        query = query.where(Alert.status == status)
    if store_ids is not None:
        query = query.where(Alert.store_id.in_(list(store_ids)))
    if region_id:
        query = query.where(Alert.region_id == region_id)
    return list(session.scalars(query))


# --- response timeliness -------------------------------------------------------------------


@dataclass(frozen=True)
class Timeliness:
    """预警响应及时率 = alerts acknowledged within 24 h ÷ alerts raised, for alerts raised in [since, until).

    An alert not acknowledged yet whose 24 h are not over is neither in time nor late: it is
    pending, counted apart and left out of the ratio until it is acknowledged or its time runs out.
    """

    chain: Ratio
    by_region: dict[str, Ratio]
    by_store: dict[str, Ratio]
    region_names: dict[str, dict[str, str]]
    pending: int = 0  # chain-wide, in the selection


def response_timeliness(
    *,
    session: Session,
    since: datetime,
    until: datetime,
    region_id: str | None = None,
    store_id: str | None = None,
    now: datetime | None = None,
) -> Timeliness:
    now = now or datetime.now(UTC)
    query = select(Alert.store_id, Alert.region_id, Alert.raised_at, Alert.acknowledged_at).where(
        Alert.raised_at >= since, Alert.raised_at < until
    )
    if region_id:
        query = query.where(Alert.region_id == region_id)
    if store_id:
        query = query.where(Alert.store_id == store_id)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    pending = 0
    for store, region, raised_at, acknowledged_at in session.execute(query):
        if acknowledged_at is None and now - raised_at < ACK_WINDOW:
            pending += 1
            continue
        in_time = acknowledged_at is not None and acknowledged_at - raised_at <= ACK_WINDOW
        for key in (("store", store), ("region", region), ("chain", "")):
            counts[key][0] += int(in_time)
            counts[key][1] += 1
    chain = Ratio(*counts[("chain", "")]) if ("chain", "") in counts else Ratio(0, 0)
    regions = {
        name: (zh, en) for name, zh, en in session.execute(select(Region.region_id, Region.name_zh, Region.name_en))
    }
    return Timeliness(
        chain=chain,
        by_region={k: Ratio(*v) for (kind, k), v in sorted(counts.items()) if kind == "region"},
        by_store={k: Ratio(*v) for (kind, k), v in sorted(counts.items()) if kind == "store"},
        region_names={k: {"zh-CN": zh, "en": en} for k, (zh, en) in regions.items()},
        pending=pending,
    )
