"""The rule types as small pure classes: series in, verdict out; no database, no scheduler.

A verdict says whether the rule fires for one store (and subject) at the close of one
business day, which window of days it covers (the window's first day is part of the dedup
key, so one episode raises one alert however often it is evaluated) and whether the
condition was seen to be clear that day (which resolves an open alert automatically).
"""

from __future__ import annotations

import calendar
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from store_rules.alerts.definitions import (
    AnyRule,
    ChangeParams,
    ChangeRule,
    ExpiryWatchParams,
    ExpiryWatchRule,
    SilenceParams,
    SilenceRule,
    StockoutForecastParams,
    StockoutForecastRule,
    StockWatchParams,
    StockWatchRule,
    ThresholdStreakParams,
    ThresholdStreakRule,
)
from store_rules.metrics import Ratio
from store_rules.stock import SkuPosition

# How far back a streak is followed to find its first day.
EPISODE_LOOKBACK_DAYS = 30


@dataclass(frozen=True)
class Verdict:
    fired: bool
    cleared: bool
    window_start: date | None = None
    window_end: date | None = None
    values: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None


def _pct(ratio: Ratio) -> float | None:
    return None if ratio.percent is None else round(ratio.percent, 1)


def _day_value(day: date, ratio: Ratio) -> dict[str, Any]:
    return {
        "day": day.isoformat(),
        "numerator": ratio.numerator,
        "denominator": ratio.denominator,
        "percent": _pct(ratio),
    }


def _period_value(first: date, last: date, ratio: Ratio) -> dict[str, Any]:
    return {
        "first": first.isoformat(), "last": last.isoformat(), "numerator": ratio.numerator,
        "denominator": ratio.denominator, "percent": _pct(ratio),
    }  # fmt: skip


class MetricRule(ABC):
    """A rule over one metric's daily ratios of one store."""

    @property
    @abstractmethod
    def lookback_days(self) -> int:
        """Days before the evaluated day whose values the rule reads."""

    @abstractmethod
    def evaluate(self, series: Mapping[date, Ratio], day: date) -> list[Verdict]:
        """Verdicts at the close of `day`; missing days count as 0 / 0."""


class ThresholdStreak(MetricRule):
    """The metric below (or above) a threshold on N consecutive business days.

    A day with fewer than `min_denominator` cases has no value: it breaks a streak, and it
    clears nothing either.
    """

    def __init__(self, params: ThresholdStreakParams) -> None:
        self.params = params

    @property
    def lookback_days(self) -> int:
        return max(self.params.days, EPISODE_LOOKBACK_DAYS)

    def breaches(self, ratio: Ratio) -> bool | None:
        if ratio.denominator < self.params.min_denominator or ratio.percent is None:
            return None
        if self.params.direction == "below":
            return ratio.percent < self.params.threshold_percent
        return ratio.percent > self.params.threshold_percent

    def evaluate(self, series: Mapping[date, Ratio], day: date) -> list[Verdict]:
        empty = Ratio(0, 0)
        today = self.breaches(series.get(day, empty))
        if not today:
            return [Verdict(fired=False, cleared=today is False)]
        start = day
        for back in range(1, self.lookback_days + 1):
            previous = day - timedelta(days=back)
            if not self.breaches(series.get(previous, empty)):
                break
            start = previous
        length = (day - start).days + 1
        if length < self.params.days:
            return [Verdict(fired=False, cleared=False)]
        # The values of the whole evidence window, so a reader sees the good day before the streak too.
        shown = [day - timedelta(days=i) for i in range(max(self.params.days, self.params.evidence_days) - 1, -1, -1)]
        values = {
            "metric": self.params.metric,
            "threshold_percent": self.params.threshold_percent,
            "direction": self.params.direction,
            "streak_days": length,
            "days": [_day_value(d, series.get(d, empty)) for d in shown],
        }
        return [Verdict(fired=True, cleared=False, window_start=start, window_end=day, values=values)]


def period_of(day: date, period: str) -> tuple[date, date]:
    """[first, last] day of the calendar period (Monday-based weeks) that contains `day`."""
    if period == "day":
        return day, day
    if period == "week":
        first = day - timedelta(days=day.weekday())
        return first, first + timedelta(days=6)
    last = calendar.monthrange(day.year, day.month)[1]
    return day.replace(day=1), day.replace(day=last)


class Change(MetricRule):
    """The metric of a closed period changed by more than X % against the period before.

    Evaluated at the close of each period's last day; the change is relative
    ((current − previous) ÷ previous) and each period sums its cases before dividing.
    """

    def __init__(self, params: ChangeParams) -> None:
        self.params = params

    @property
    def lookback_days(self) -> int:
        return {"day": 1, "week": 13, "month": 62}[self.params.period]

    @staticmethod
    def _sum(series: Mapping[date, Ratio], first: date, last: date) -> Ratio:
        numerator = denominator = 0
        current = first
        while current <= last:
            ratio = series.get(current)
            if ratio is not None:
                numerator += ratio.numerator
                denominator += ratio.denominator
            current += timedelta(days=1)
        return Ratio(numerator, denominator)

    def evaluate(self, series: Mapping[date, Ratio], day: date) -> list[Verdict]:
        first, last = period_of(day, self.params.period)
        if day != last:
            return []
        before_first, before_last = period_of(first - timedelta(days=1), self.params.period)
        now, before = self._sum(series, first, last), self._sum(series, before_first, before_last)
        minimum = self.params.min_denominator
        if now.denominator < minimum or before.denominator < minimum or not before.ratio or now.ratio is None:
            return [Verdict(fired=False, cleared=False)]
        change = (now.ratio - before.ratio) / before.ratio * 100
        wanted = {"drop": change < 0, "rise": change > 0, "either": change != 0}[self.params.direction]
        fired = wanted and abs(change) > self.params.change_percent
        values = {
            "metric": self.params.metric,
            "period": self.params.period,
            "change_percent": round(change, 1),
            "current": _period_value(first, last, now),
            "previous": _period_value(before_first, before_last, before),
        }
        return [Verdict(fired=fired, cleared=not fired, window_start=first, window_end=last, values=values)]


class Silence:
    """Nothing recorded for N business days, per store or per subject (e.g. a footfall sensor)."""

    def __init__(self, params: SilenceParams) -> None:
        self.params = params

    def evaluate(
        self,
        last_seen: Mapping[str | None, date | None],
        day: date,
        never_reported: Mapping[str, date | None] | None = None,
    ) -> list[Verdict]:
        """`last_seen`: subject → the last local day with a record up to `day` (None: none in the lookback).

        `never_reported` (per-sensor rules): the store's counters that never sent a record and
        whose grace period after registration is over → the local day each was registered. They
        are left out of `last_seen`: a counter just installed is not "silent for 30 days", and
        the store gets one alert for all of them instead of one per counter.
        """
        verdicts = []
        earliest = day - timedelta(days=self.params.lookback_days - 1)
        for subject, seen in sorted(last_seen.items(), key=lambda item: item[0] or ""):
            first_silent = (seen + timedelta(days=1)) if seen is not None else earliest
            silent_days = (day - first_silent).days + 1
            values = {
                "source": self.params.source,
                "last_seen": seen.isoformat() if seen else None,
                "silent_days": silent_days,
                "days": self.params.days,
            }
            fired = silent_days >= self.params.days
            verdicts.append(
                Verdict(
                    fired=fired, cleared=silent_days == 0, window_start=first_silent if fired else None,
                    window_end=day if fired else None, values=values, subject=subject,
                )
            )  # fmt: skip
        if never_reported is not None:
            verdicts.append(self._never_reported(never_reported, day))
        return verdicts

    def _never_reported(self, counters: Mapping[str, date | None], day: date) -> Verdict:
        if not counters:
            return Verdict(fired=False, cleared=True, window_start=None, window_end=None, values={})
        known = [registered for registered in counters.values() if registered is not None]
        registered_on = min(known) if known else None
        values = {
            "source": self.params.source,
            "never_reported": sorted(counters),
            "registered_on": registered_on.isoformat() if registered_on else None,
        }
        start = min(registered_on, day) if registered_on else day
        return Verdict(fired=True, cleared=False, window_start=start, window_end=day, values=values)


# --- stock rules: positions of one store in, one verdict per SKU out ---------------------------


def _units(value: Decimal) -> float:
    return float(value)


class StockPositionRule(ABC):
    """A rule over the stock positions of one store at the close of a business day.

    `day` is the last business day whose sales count; `today` is the date expiry is counted from.
    """

    @property
    @abstractmethod
    def sales_days(self) -> int:
        """Business days of sales, up to and including `day`, the rule reads."""

    @abstractmethod
    def evaluate(self, positions: Sequence[SkuPosition], day: date, today: date) -> list[Verdict]: ...


class StockWatch(StockPositionRule):
    """On-hand below safety stock while the last window's sales grew more than X % over the window before.

    Fires strictly above the growth threshold and strictly below safety stock. A SKU without
    safety stock, or whose previous window sold less than `min_previous_units`, is not judged.
    Drafts are decided by people, so the rule never clears anything by itself.
    """

    def __init__(self, params: StockWatchParams) -> None:
        self.params = params

    @property
    def sales_days(self) -> int:
        return 2 * self.params.window_days

    def evaluate(self, positions: Sequence[SkuPosition], day: date, today: date) -> list[Verdict]:
        window = self.params.window_days
        last_first = day - timedelta(days=window - 1)
        previous_last = last_first - timedelta(days=1)
        previous_first = previous_last - timedelta(days=window - 1)
        verdicts = []
        for position in positions:
            if position.safety_stock is None:
                continue
            recent = position.sales(last_first, day)
            previous = position.sales(previous_first, previous_last)
            growth = None
            if previous >= Decimal(str(self.params.min_previous_units)):
                growth = (recent - previous) / previous * 100
            below = position.on_hand < position.safety_stock
            fired = below and growth is not None and growth > Decimal(str(self.params.growth_percent))
            values = {
                "sku": position.sku, "sku_name": position.name, "on_hand": _units(position.on_hand),
                "safety_stock": _units(position.safety_stock), "snapshot_at": position.snapshot_at.isoformat(),
                "sales_last": _units(recent), "sales_previous": _units(previous),
                "last_window": [last_first.isoformat(), day.isoformat()],
                "previous_window": [previous_first.isoformat(), previous_last.isoformat()],
                "growth_percent": None if growth is None else round(float(growth), 1),
                "threshold_percent": self.params.growth_percent,
            }  # fmt: skip
            verdicts.append(
                Verdict(
                    fired=fired, cleared=False, window_start=day if fired else None, window_end=day if fired else None,
                    values=values, subject=position.sku,
                )
            )  # fmt: skip
        return verdicts


class ExpiryWatch(StockPositionRule):
    """Lots whose expiry date falls within the window: after `today` and at most N days away.

    The window is per SKU category when one is configured. Lots already expired are not
    promoted (they must leave the shelf); they are listed in the values for the manager.
    """

    def __init__(self, params: ExpiryWatchParams) -> None:
        self.params = params

    @property
    def sales_days(self) -> int:
        return 0

    def window_for(self, category: str | None) -> int:
        return self.params.category_window_days.get(category or "", self.params.window_days)

    def evaluate(self, positions: Sequence[SkuPosition], day: date, today: date) -> list[Verdict]:
        verdicts = []
        for position in positions:
            window = self.window_for(position.category)
            horizon = today + timedelta(days=window)
            at_risk = [lot for lot in position.lots if lot.qty > 0 and today < lot.expires_on <= horizon]
            expired = [lot for lot in position.lots if lot.qty > 0 and lot.expires_on <= today]
            units = sum((lot.qty for lot in at_risk), Decimal(0))
            fired = bool(at_risk) and units >= Decimal(str(self.params.min_units))
            values = {
                "sku": position.sku, "sku_name": position.name, "category": position.category,
                "window_days": window, "horizon": horizon.isoformat(), "units_at_risk": _units(units),
                "on_hand": _units(position.on_hand), "snapshot_at": position.snapshot_at.isoformat(),
                "lots": [
                    {"lot": lot.lot, "qty": _units(lot.qty), "expires_on": lot.expires_on.isoformat(),
                     "days_left": (lot.expires_on - today).days}
                    for lot in at_risk
                ],
                "expired_lots": [
                    {"lot": lot.lot, "qty": _units(lot.qty), "expires_on": lot.expires_on.isoformat()}
                    for lot in expired
                ],
            }  # fmt: skip
            verdicts.append(
                Verdict(
                    fired=fired, cleared=False, window_start=today if fired else None,
                    window_end=horizon if fired else None, values=values, subject=position.sku,
                )
            )  # fmt: skip
        return verdicts


class StockoutForecast(StockPositionRule):
    """Days of cover (on-hand ÷ average daily sales) below the replenishment lead time."""

    def __init__(self, params: StockoutForecastParams) -> None:
        self.params = params

    @property
    def sales_days(self) -> int:
        return self.params.sales_days

    def evaluate(self, positions: Sequence[SkuPosition], day: date, today: date) -> list[Verdict]:
        first = day - timedelta(days=self.params.sales_days - 1)
        verdicts = []
        for position in positions:
            lead = (
                position.lead_time_days if position.lead_time_days is not None else self.params.default_lead_time_days
            )
            daily = position.sales(first, day) / self.params.sales_days
            if daily <= 0:
                verdicts.append(Verdict(fired=False, cleared=True, subject=position.sku))
                continue
            cover = max(position.on_hand, Decimal(0)) / daily
            fired = cover < lead
            values = {
                "sku": position.sku, "sku_name": position.name, "on_hand": _units(position.on_hand),
                "average_daily_sales": round(float(daily), 2), "sales_window": [first.isoformat(), day.isoformat()],
                "days_of_cover": round(float(cover), 1), "lead_time_days": lead,
                "snapshot_at": position.snapshot_at.isoformat(),
            }  # fmt: skip
            verdicts.append(
                Verdict(
                    fired=fired, cleared=not fired, window_start=day if fired else None,
                    window_end=day if fired else None, values=values, subject=position.sku,
                )
            )  # fmt: skip
        return verdicts


def stock_rule_for(rule: AnyRule) -> StockPositionRule | None:
    if isinstance(rule, StockWatchRule):
        return StockWatch(rule.params)
    if isinstance(rule, ExpiryWatchRule):
        return ExpiryWatch(rule.params)
    if isinstance(rule, StockoutForecastRule):
        return StockoutForecast(rule.params)
    return None


def metric_rule_for(rule: AnyRule) -> MetricRule | None:
    if isinstance(rule, ThresholdStreakRule):
        return ThresholdStreak(rule.params)
    if isinstance(rule, ChangeRule):
        return Change(rule.params)
    return None


def silence_rule_for(rule: AnyRule) -> Silence | None:
    return Silence(rule.params) if isinstance(rule, SilenceRule) else None
