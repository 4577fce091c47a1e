"""Alerts whose numbers stay true, on SQLite and TimescaleDB: a draft exists only with its alert,
response timeliness counts young open alerts as pending, a counter that never reported raises
one alert per store after its grace period, and decided drafts close their alerts through the
promotion events (the promotion side never imports the alert side)."""

from __future__ import annotations

import ast
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select, update

from ingest.db import session_scope
from ingest.models import Sensor
from ingest.settings import Settings
from store_rules.alerts import service as alerts
from store_rules.alerts.models import OPEN, RESOLVED, Alert, Notification
from store_rules.promotions import service as promotions
from store_rules.promotions.models import Promotion
from tests.test_alerts import CHANNELS, seed_rule
from tests.test_metrics import ingest
from tests.test_promotions import CLOSING, D, evaluate, promotions_of, stock_watch_scenario

SHANGHAI = ZoneInfo("Asia/Shanghai")
REPO = Path(__file__).resolve().parents[1]


# --- a draft exists only with its alert ------------------------------------------------------


def test_a_draft_is_made_only_when_its_alert_is_raised(chain: Engine) -> None:
    stock_watch_scenario(chain)
    assert len(evaluate(chain, "stock_watch").raised) == 1
    (first,) = promotions_of(chain)
    with session_scope(chain) as session:
        promotions.reject(
            session=session, promotion_id=first.promotion_id, user_id="mgr-s001", reason="货够", now=CLOSING
        )
    # The refusal's cool-down is over, but the same window's alert exists already (resolved by the
    # refusal): evaluating that day again raises nothing, so it drafts nothing either.
    later = CLOSING + timedelta(days=30)
    assert evaluate(chain, "stock_watch", now=later).raised == []
    drafts = promotions_of(chain)
    assert [(p.promotion_id, p.status) for p in drafts] == [(first.promotion_id, "rejected")]
    with session_scope(chain) as session:
        (alert,) = session.scalars(select(Alert)).all()
        assert (alert.id, alert.status) == (first.alert_id, RESOLVED)


def test_two_evaluations_racing_make_one_alert_and_one_linked_draft(pg_chain: Engine) -> None:
    stock_watch_scenario(pg_chain)
    barrier = threading.Barrier(2)
    raised: list[list[str]] = []

    def run() -> None:
        with session_scope(pg_chain) as session:
            barrier.wait(timeout=30)
            report = alerts.evaluate_rule(
                session=session, rule=seed_rule("stock_watch"), day=D, now=CLOSING, channels=CHANNELS
            )
            raised.append(report.raised)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(len(r) for r in raised) == [0, 1]
    with session_scope(pg_chain) as session:
        (alert,) = session.scalars(select(Alert)).all()
        (draft,) = session.scalars(select(Promotion)).all()
        assert draft.alert_id == alert.id and draft.status == "pending"


# --- response timeliness ---------------------------------------------------------------------


def add_alert(session: Any, key: str, store_id: str, region_id: str, raised_at: datetime) -> Alert:
    alert = Alert(
        dedup_key=key, rule_id="r", rule_version=1, rule_type="silence", severity="low", store_id=store_id,
        region_id=region_id, subject=None, window_start=D, window_end=D, status=OPEN, level="store",
        role="manager", summary={"zh-CN": key, "en": key}, values={}, evidence=[], raised_at=raised_at,
    )  # fmt: skip
    session.add(alert)
    session.flush()
    return alert


def test_an_open_alert_younger_than_24_hours_is_pending_not_late(chain: Engine) -> None:
    now = datetime.now(UTC)  # the API asks without a clock: the young alert is young now
    with session_scope(chain) as session:
        in_time = add_alert(session, "in-time", "S001", "R-ZJ", now - timedelta(hours=30))
        add_alert(session, "late", "S002", "R-ZJ", now - timedelta(hours=30))
        add_alert(session, "young", "S003", "R-SH", now - timedelta(hours=2))
        alerts.acknowledge(session=session, alert_id=in_time.id, user_id="u", now=now - timedelta(hours=27))
    since, until = now - timedelta(days=7), now
    with session_scope(chain) as session:
        result = alerts.response_timeliness(session=session, since=since, until=until)
        assert (result.chain.numerator, result.chain.denominator, result.pending) == (1, 2, 1)
        assert {k: (v.numerator, v.denominator) for k, v in result.by_store.items()} == {
            "S001": (1, 1), "S002": (0, 1),
        }  # fmt: skip
        assert "R-SH" not in result.by_region
        # A day later the young one is late too.
        day_after = alerts.response_timeliness(session=session, since=since, until=until, now=now + timedelta(days=1))
        assert (day_after.chain.numerator, day_after.chain.denominator, day_after.pending) == (1, 3, 0)


# --- counters that never reported ------------------------------------------------------------

REGISTERED = datetime(2026, 11, 16, 10, 0, tzinfo=SHANGHAI)


def footfall(sensor: str, store_id: str, at: datetime) -> dict[str, Any]:
    return {
        "type": "footfall", "event_id": f"ff-{sensor}-{at:%m%d%H%M}", "store_id": store_id, "sensor_id": sensor,
        "occurred_at": at.isoformat(), "period_seconds": 900, "in": 12, "out": 11,
    }  # fmt: skip


def dead_counter(engine: Engine, now: datetime, grace: timedelta | None = None) -> alerts.EvaluationReport:
    with session_scope(engine) as session:
        return alerts.evaluate_rule(
            session=session, rule=seed_rule("dead_counter"), now=now, channels=CHANNELS, counter_grace=grace
        )


def test_counters_that_never_reported_raise_one_alert_per_store_after_the_grace_period(chain: Engine) -> None:
    assert Settings().counter_grace_hours == 24  # the default grace period: one day
    with session_scope(chain) as session:
        session.add_all([
            Sensor(store_id="S001", sensor_id="door-2", name="side door"),
            Sensor(store_id="S002", sensor_id="door-9", name="main door"),
        ])  # fmt: skip
        session.flush()
        session.execute(update(Sensor).values(registered_at=REGISTERED))
    # Installation day and the night after: nothing, where today 3 "no footfall for 30 days" alerts came.
    assert dead_counter(chain, REGISTERED + timedelta(hours=2)).raised == []
    assert dead_counter(chain, REGISTERED + timedelta(hours=23)).raised == []
    with session_scope(chain) as session:
        assert session.scalars(select(Alert)).all() == []
    # A day after registration: one alert per store, naming its silent counters.
    report = dead_counter(chain, REGISTERED + timedelta(hours=25))
    assert sorted(report.raised) == ["dead_counter|S001||2026-11-16", "dead_counter|S002||2026-11-16"]
    with session_scope(chain) as session:
        raised = {a.store_id: a for a in session.scalars(select(Alert))}
        assert raised["S001"].summary == {
            "zh-CN": "温州鹿城店 客流计 door-1、door-2 自登记（2026-11-16）以来从未上报数据",
            "en": "Wenzhou Lucheng: footfall counters door-1, door-2 never reported since they were registered "
            "(2026-11-16)",
        }
        assert raised["S002"].summary == {
            "zh-CN": "杭州西湖店 客流计 door-9 自登记（2026-11-16）以来从未上报数据",
            "en": "Hangzhou Xihu: footfall counter door-9 never reported since it was registered (2026-11-16)",
        }
        assert raised["S001"].subject is None and raised["S001"].values["never_reported"] == ["door-1", "door-2"]
        assert len(session.scalars(select(Notification)).all()) == 2  # the managers' channel, once per store
    assert dead_counter(chain, REGISTERED + timedelta(hours=26)).raised == []
    # door-1 starts counting: S001's alert stays open for door-2; once door-2 counts too, it resolves.
    ingest(chain, [footfall("door-1", "S001", REGISTERED + timedelta(hours=26))])
    report = dead_counter(chain, REGISTERED + timedelta(hours=40))
    assert (report.raised, report.resolved) == ([], 0)
    ingest(chain, [footfall("door-2", "S001", REGISTERED + timedelta(hours=27))])
    report = dead_counter(chain, REGISTERED + timedelta(hours=40))
    assert (report.raised, report.resolved) == ([], 1)
    with session_scope(chain) as session:
        status = {a.store_id: a.status for a in session.scalars(select(Alert))}
    assert status == {"S001": RESOLVED, "S002": OPEN}


def test_the_grace_period_is_configurable(chain: Engine) -> None:
    with session_scope(chain) as session:
        session.execute(update(Sensor).values(registered_at=REGISTERED))
    assert dead_counter(chain, REGISTERED + timedelta(hours=2), grace=timedelta(hours=3)).raised == []
    report = dead_counter(chain, REGISTERED + timedelta(hours=4), grace=timedelta(hours=3))
    assert report.raised == ["dead_counter|S001||2026-11-15"]  # its window: the last closed day before


# --- promotion decisions close alerts through events -------------------------------------------


def test_deciding_a_draft_resolves_its_alert_and_promotions_never_import_alerts(chain: Engine) -> None:
    stock_watch_scenario(chain)
    evaluate(chain, "stock_watch")
    (draft,) = promotions_of(chain)
    with session_scope(chain) as session:
        promotions.approve(session=session, promotion_id=draft.promotion_id, user_id="mgr-s001", now=CLOSING)
    with session_scope(chain) as session:
        alert = session.get(Alert, draft.alert_id)
        assert alert is not None and (alert.status, alert.resolved_by) == (RESOLVED, "system")
        (last,) = [t for t in alerts.transitions(session=session, alert_id=alert.id) if t.action == "resolved"]
        assert last.note == f"draft {draft.promotion_id} approved by mgr-s001"
    importing_alerts = []
    for path in [REPO / "store_rules" / "promotions" / "service.py", REPO / "store_rules" / "promotion_events.py"]:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            importing_alerts += [f"{path.name}: {n}" for n in names if n.startswith("store_rules.alerts")]
    assert importing_alerts == []
