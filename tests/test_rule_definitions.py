"""Rule types and rule files without a database: verdicts, windows, and refused files with line numbers."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from store_rules.alerts.definitions import (
    RULES_DIR,
    ChangeParams,
    RuleDefinitionError,
    SilenceParams,
    ThresholdStreakParams,
    parse_channels,
    parse_rule,
)
from store_rules.alerts.rules import Change, Silence, ThresholdStreak
from store_rules.metrics import Ratio

D1 = date(2026, 11, 2)  # a Monday
PASS_RATE = ThresholdStreakParams(metric="insurance_pass_rate", direction="below", threshold_percent=65, days=2)


def days(*ratios: Ratio, start: date = D1) -> dict[date, Ratio]:
    return {start + timedelta(days=i): r for i, r in enumerate(ratios)}


def test_seventy_sixty_sixty_two_fires_once_at_the_close_of_day_three() -> None:
    series = days(Ratio(7, 10), Ratio(6, 10), Ratio(31, 50))
    rule = ThresholdStreak(PASS_RATE)
    assert rule.evaluate(series, D1) == rule.evaluate(series, D1)
    (day1,) = rule.evaluate(series, D1)
    (day2,) = rule.evaluate(series, D1 + timedelta(days=1))
    (day3,) = rule.evaluate(series, D1 + timedelta(days=2))
    assert (day1.fired, day1.cleared) == (False, True)  # 70 % is fine
    assert (day2.fired, day2.cleared) == (False, False)  # one bad day is not yet a streak
    assert day3.fired and day3.window_start == D1 + timedelta(days=1) and day3.window_end == D1 + timedelta(days=2)
    assert [d["percent"] for d in day3.values["days"]] == [70.0, 60.0, 62.0]
    assert day3.values["streak_days"] == 2


def test_a_longer_streak_keeps_its_first_day_so_one_episode_is_one_alert() -> None:
    series = days(Ratio(7, 10), Ratio(6, 10), Ratio(6, 10), Ratio(5, 10), Ratio(1, 10))
    rule = ThresholdStreak(PASS_RATE)
    starts = {v.window_start for d in range(2, 5) for v in rule.evaluate(series, D1 + timedelta(days=d))}
    assert starts == {D1 + timedelta(days=1)}


def test_a_day_without_checks_breaks_the_streak_and_clears_nothing() -> None:
    series = days(Ratio(6, 10), Ratio(0, 0), Ratio(6, 10))
    rule = ThresholdStreak(PASS_RATE)
    (quiet,) = rule.evaluate(series, D1 + timedelta(days=1))
    (after,) = rule.evaluate(series, D1 + timedelta(days=2))
    assert not quiet.fired and not quiet.cleared
    assert not after.fired


def test_exactly_at_the_threshold_is_not_below_it() -> None:
    series = days(Ratio(13, 20), Ratio(13, 20))
    (verdict,) = ThresholdStreak(PASS_RATE).evaluate(series, D1 + timedelta(days=1))
    assert not verdict.fired and verdict.cleared


def test_weekly_change_fires_on_the_last_day_of_the_week_only() -> None:
    params = ChangeParams(metric="conversion_rate", direction="drop", change_percent=25, period="week")
    rule = Change(params)
    previous_week = {D1 - timedelta(days=7 - i): Ratio(40, 100) for i in range(7)}
    this_week = {D1 + timedelta(days=i): Ratio(25, 100) for i in range(7)}
    series = {**previous_week, **this_week}
    assert rule.evaluate(series, D1 + timedelta(days=5)) == []  # Saturday: the week is not closed
    (sunday,) = rule.evaluate(series, D1 + timedelta(days=6))
    assert sunday.fired and sunday.values["change_percent"] == -37.5
    assert (sunday.window_start, sunday.window_end) == (D1, D1 + timedelta(days=6))
    milder = {**previous_week, **{d: Ratio(31, 100) for d in this_week}}  # -22.5 %: under the bar
    assert not rule.evaluate(milder, D1 + timedelta(days=6))[0].fired
    rises = Change(params.model_copy(update={"direction": "rise"}))
    assert not rises.evaluate(series, D1 + timedelta(days=6))[0].fired


def test_silence_per_sensor_counts_days_since_the_last_record() -> None:
    rule = Silence(SilenceParams(source="footfall", per="sensor", days=2, lookback_days=30))
    day = date(2026, 11, 20)
    verdicts = {v.subject: v for v in rule.evaluate({"door-1": day, "door-2": day - timedelta(days=2)}, day)}
    assert not verdicts["door-1"].fired and verdicts["door-1"].cleared
    assert verdicts["door-2"].fired and verdicts["door-2"].window_start == day - timedelta(days=1)
    (never,) = rule.evaluate({"door-3": None}, day)
    assert never.fired and never.window_start == day - timedelta(days=29)
    (one_day,) = rule.evaluate({"door-2": day - timedelta(days=1)}, day)
    assert not one_day.fired and not one_day.cleared


def test_the_seed_rules_and_channels_parse() -> None:
    rules = {p.stem: parse_rule(p.read_text("utf-8"), str(p)) for p in RULES_DIR.glob("*.yaml") if p.stem != "channels"}
    seed = rules["pass_rate_watch"]
    assert seed.type == "threshold_streak" and seed.params.threshold_percent == 65 and seed.params.days == 2
    assert seed.route.level == "region" and seed.route.role == "supervisor" and seed.enabled
    assert not rules["step_completeness_draft"].enabled
    channels = parse_channels((RULES_DIR / "channels.yaml").read_text("utf-8"))
    routed = channels.routed(level="region", store_id="S001", region_id="R-ZJ")
    assert [c.id for c in routed] == ["wecom-zj-supervisors"]


GOOD = """\
id: low_pass
name: {zh-CN: 通过率, en: Pass rate}
type: threshold_streak
scope: {chain: true}
route: {level: region}
params:
  metric: insurance_pass_rate
  direction: below
  threshold_percent: 65
  days: 2
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  threshold_percent: 65", "  threshold_percent: 165", "rule.yaml:9: params.threshold_percent: Input should"),
        ("  metric: insurance_pass_rate", "  metric: pass_rate", "rule.yaml:7: params.metric: Input should be"),
        ("type: threshold_streak", "type: treshold", "rule.yaml:3: type: unknown rule type"),
        ("scope: {chain: true}", "scope: {chain: true, stores: [S001]}", "rule.yaml:4: scope: give exactly one of"),
        ("route: {level: region}", "route: {level: region, role: manager}", "rule.yaml:5: route: role 'manager'"),
        ("  days: 2", "  days: 2\n  colour: red", "rule.yaml:11: params.colour: Extra inputs are not permitted"),
        ("  days: 2", "  days: [2", "rule.yaml:11: not valid YAML"),
        ("  days: 2\n", "", "rule.yaml:6: params.days: Field required"),
    ],
)  # fmt: skip
def test_a_bad_rule_file_is_refused_with_line_and_reason(old: str, new: str, expected: str) -> None:
    assert parse_rule(GOOD, "rule.yaml").id == "low_pass"
    with pytest.raises(RuleDefinitionError) as refused:
        parse_rule(GOOD.replace(old, new), "rule.yaml")
    assert expected in str(refused.value)
