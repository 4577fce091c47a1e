"""Back-testing: replay a rule over stored history and list the alerts it would have raised.

The replay runs the live evaluation (`evaluate_day`) day by day with an in-memory sink, so
it notifies nobody and writes nothing, and it raises exactly what the live engine raises on
the same data: the same verdicts, dedup keys, open-alert guard and automatic resolution.
A draft rule (``enabled: false``, or a file not loaded yet) can be back-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from sqlalchemy.orm import Session

from store_rules.alerts.definitions import AnyRule
from store_rules.alerts.rules import metric_rule_for
from store_rules.alerts.service import Candidate, MetricSource, evaluate_day, scope_stores


@dataclass(frozen=True)
class BacktestAlert:
    raised_on: date  # the business day at whose close it would have been raised
    store_id: str
    subject: str | None
    window_start: date
    window_end: date
    summary: dict[str, str]
    values: dict[str, Any]
    evidence_count: int
    dedup_key: str
    resolved_on: date | None = None


@dataclass
class MemorySink:
    alerts: list[BacktestAlert] = field(default_factory=list)
    _open: dict[tuple[str, str, str | None], int] = field(default_factory=dict)
    _keys: set[str] = field(default_factory=set)
    day: date | None = None

    def unresolved(self, rule: AnyRule, store_id: str, subject: str | None) -> bool:
        return (rule.id, store_id, subject) in self._open

    def raise_alert(self, candidate: Candidate) -> bool:
        if candidate.dedup_key in self._keys:
            return False
        verdict = candidate.verdict
        assert verdict.window_start is not None and verdict.window_end is not None
        self._keys.add(candidate.dedup_key)
        self._open[(candidate.rule.id, candidate.store_id, verdict.subject)] = len(self.alerts)
        self.alerts.append(
            BacktestAlert(
                raised_on=candidate.day, store_id=candidate.store_id, subject=verdict.subject,
                window_start=verdict.window_start, window_end=verdict.window_end, summary=candidate.summary,
                values=verdict.values, evidence_count=len(candidate.evidence), dedup_key=candidate.dedup_key,
            )
        )  # fmt: skip
        return True

    def clear(self, rule: AnyRule, store_id: str, subject: str | None, day: date) -> int:
        index = self._open.pop((rule.id, store_id, subject), None)
        if index is None:
            return 0
        alert = self.alerts[index]
        self.alerts[index] = replace(alert, resolved_on=day)
        return 1


def backtest(*, session: Session, rule: AnyRule, first: date, last: date) -> list[BacktestAlert]:
    """The alerts `rule` would have raised evaluating every business day from `first` to `last`."""
    if last < first:
        raise ValueError(f"--to: {last} is before --from {first}")
    stores = scope_stores(session=session, rule=rule)
    source = MetricSource(session)
    metric_rule = metric_rule_for(rule)
    if metric_rule is not None and stores:
        source.preload([s.store_id for s in stores], first - timedelta(days=metric_rule.lookback_days), last)
    sink = MemorySink()
    day = first
    while day <= last:
        evaluate_day(session=session, rule=rule, stores=stores, day=day, sink=sink, source=source)
        day += timedelta(days=1)
    return sink.alerts
