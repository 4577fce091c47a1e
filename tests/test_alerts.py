"""Rules and alerts on SQLite and TimescaleDB: the pass-rate scenario, routing, evidence, dedup,
lifecycle, escalation, timeliness and back-testing against live evaluation."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ingest.db import session_scope
from ingest.models import Sensor
from store_rules.alerts import service
from store_rules.alerts.backtest import backtest
from store_rules.alerts.definitions import (
    RULES_DIR,
    AnyRule,
    ChannelSet,
    RuleDefinitionError,
    load_rules_dir,
    parse_rule,
    store_rule,
    stored_rule,
    stored_rules,
)
from store_rules.alerts.models import Alert, AlertTransition, Notification
from tests.test_metrics import SHANGHAI, ingest, local, step_event

D1 = date(2026, 11, 16)
D2, D3, D4 = (D1 + timedelta(days=n) for n in (1, 2, 3))
CUSTOMERS = ["王建国", "李秀英", "张伟", "欧阳娜娜"]
CHANNELS = ChannelSet.model_validate(
    {
        "channels": [
            {"id": "zj", "adapter": "webhook", "config": {"url": "http://127.0.0.1:9/zj", "secret": "s"},
             "audience": {"role": "supervisor", "regions": ["R-ZJ"]}},
            {"id": "sh", "adapter": "webhook", "config": {"url": "http://127.0.0.1:9/sh", "secret": "s"},
             "audience": {"role": "supervisor", "regions": ["R-SH"]}},
            {"id": "hq", "adapter": "webhook", "config": {"url": "http://127.0.0.1:9/hq", "secret": "s"},
             "audience": {"role": "headquarters"}},
            {"id": "managers", "adapter": "webhook", "config": {"url": "http://127.0.0.1:9/m", "secret": "s"},
             "audience": {"role": "manager"}},
        ]
    }
)  # fmt: skip


def seed_rule(name: str = "pass_rate_watch") -> AnyRule:
    path = RULES_DIR / f"{name}.yaml"
    return parse_rule(path.read_text("utf-8"), str(path))


def insurance_day(day: date, passes: int, fails: int, *, store_id: str = "S001") -> list[dict[str, Any]]:
    """One consultation per check, spread over the day: symptoms recorded, then the check."""
    events = []
    for n in range(passes + fails):
        cid = f"{store_id}-{day:%m%d}-{n:03d}"
        at = local(day, 9) + timedelta(minutes=7 * n)
        failed = n < fails
        customer = {"member_id": f"M{n:05d}", "name": CUSTOMERS[n % len(CUSTOMERS)]}
        symptoms = step_event(
            cid, "symptoms", at, store_id=store_id, data={"text": "胸闷", "keywords": ["胸闷", "心悸"]}
        )
        check = step_event(
            cid, "insurance_check", at + timedelta(minutes=2), store_id=store_id,
            data={"result": "fail", "reason": "医保卡过期"} if failed else {"result": "pass"},
        )  # fmt: skip
        events += [{**symptoms, "customer": customer}, {**check, "customer": customer}]
    return events


def scenario(engine: Engine) -> None:
    """S001: 70 %, 60 %, 62 % on D1–D3 (3 + 4 + 19 failed checks); S002 healthy; S003 silent."""
    ingest(engine, insurance_day(D1, 7, 3) + insurance_day(D2, 6, 4) + insurance_day(D3, 31, 19))
    ingest(engine, [e for d in (D1, D2, D3) for e in insurance_day(d, 9, 1, store_id="S002")])


def evaluate(engine: Engine, rule: AnyRule, day: date, now: datetime | None = None) -> service.EvaluationReport:
    """Evaluate at the close of `day` (an hour after local midnight), or at `now`."""
    closing = now or datetime(day.year, day.month, day.day, tzinfo=SHANGHAI) + timedelta(days=1, hours=1)
    with session_scope(engine) as session:
        return service.evaluate_rule(session=session, rule=rule, day=day, now=closing, channels=CHANNELS)


def test_pass_rate_scenario_raises_one_alert_at_the_close_of_day_three(chain: Engine) -> None:
    scenario(chain)
    rule = seed_rule()
    raised = {day: evaluate(chain, rule, day).raised for day in (D1, D2, D3)}
    assert raised == {D1: [], D2: [], D3: ["pass_rate_watch|S001||2026-11-17"]}
    with session_scope(chain) as session:
        (alert,) = session.scalars(select(Alert)).all()
        assert (alert.store_id, alert.region_id, alert.status, alert.level, alert.role) == (
            "S001", "R-ZJ", "open", "region", "supervisor",
        )  # fmt: skip
        assert (alert.window_start, alert.window_end) == (D2, D3)
        assert [d["percent"] for d in alert.values["days"]] == [70.0, 60.0, 62.0]
        assert alert.summary["zh-CN"] == "温州鹿城店 医保核验通过率连续 2 天低于 65%（70.0%、60.0%、62.0%）"
        # The evidence: exactly the failed checks of days 1–3, oldest first, in full inside the system.
        expected = [f"S001-{d:%m%d}-{n:03d}" for d, fails in ((D1, 3), (D2, 4), (D3, 19)) for n in range(fails)]
        assert [e["consultation_id"] for e in alert.evidence] == expected
        first = alert.evidence[0]
        assert first["customer_name"] == "王建国" and first["member_id"] == "M00000"
        assert first["time"] == "2026-11-16T09:02:00+08:00" and first["staff_name"] == "李娜"
        assert first["symptom_keywords"] == ["胸闷", "心悸"] and first["reason"] == "医保卡过期"
        masked = service.masked_evidence(alert.evidence)
        assert [m["customer_name"] for m in masked[:3]] == ["王*国", "李*英", "张*"]
        assert masked[10]["customer_name"] == "欧**娜"  # D3's fourth failure
        assert all("member_id" not in m for m in masked)
        # Routed to the region's supervisors only.
        notifications = session.scalars(select(Notification)).all()
        assert [(n.channel_id, n.reason, n.status) for n in notifications] == [("zj", "raised", "pending")]
        assert [t.action for t in session.scalars(select(AlertTransition))] == ["raised"]
    # Evaluating the same windows again raises nothing new.
    assert [evaluate(chain, rule, day).raised for day in (D1, D2, D3)] == [[], [], []]
    with session_scope(chain) as session:
        assert len(session.scalars(select(Alert)).all()) == 1
        assert len(session.scalars(select(Notification)).all()) == 1


def test_the_episode_continues_without_a_second_alert_and_resolves_when_the_rate_recovers(chain: Engine) -> None:
    scenario(chain)
    ingest(chain, insurance_day(D4, 5, 5))  # 50 %: still low
    rule = seed_rule()
    for day in (D1, D2, D3, D4):
        evaluate(chain, rule, day)
    with session_scope(chain) as session:
        assert len(session.scalars(select(Alert)).all()) == 1
    d5 = D4 + timedelta(days=1)
    ingest(chain, insurance_day(d5, 9, 1))  # 90 %: clear
    report = evaluate(chain, rule, d5)
    assert report.resolved == 1 and report.raised == []
    with session_scope(chain) as session:
        (alert,) = session.scalars(select(Alert)).all()
        assert alert.status == "resolved" and alert.resolved_by == "system"
        actions = [(t.action, t.actor) for t in session.scalars(select(AlertTransition).order_by(AlertTransition.id))]
        assert actions == [("raised", "system"), ("resolved", "system")]


def test_acknowledge_resolve_and_escalation(chain: Engine) -> None:
    scenario(chain)
    rule = seed_rule()
    with session_scope(chain) as session:
        store_rule(session=session, rule=rule, source="test")
    for day in (D1, D2, D3):
        evaluate(chain, rule, day)
    with session_scope(chain) as session:
        alert_id = session.scalars(select(Alert.id)).one()
        raised_at = session.scalars(select(Alert.raised_at)).one()
        # Not yet 24 h: nothing escalates.
        assert service.escalate_due(session=session, now=raised_at + timedelta(hours=23), channels=CHANNELS) == []
        assert service.escalate_due(session=session, now=raised_at + timedelta(hours=25), channels=CHANNELS) == [
            alert_id
        ]
        assert service.escalate_due(session=session, now=raised_at + timedelta(hours=50), channels=CHANNELS) == []
        alert = session.get(Alert, alert_id)
        assert alert is not None and (alert.level, alert.role) == ("headquarters", "headquarters")
        channels = sorted((n.channel_id, n.reason) for n in session.scalars(select(Notification)))
        assert channels == [("hq", "escalated"), ("zj", "raised")]
    with session_scope(chain) as session:
        service.acknowledge(session=session, alert_id=alert_id, user_id="sup-zj", note="called the store")
    with session_scope(chain) as session, pytest.raises(service.AlertError, match="only an open alert"):
        service.acknowledge(session=session, alert_id=alert_id, user_id="sup-zj")
    with session_scope(chain) as session:
        service.resolve(session=session, alert_id=alert_id, user_id="sup-zj", note="staff retrained")
    with session_scope(chain) as session:
        history = [(t.action, t.from_status, t.to_status, t.actor, t.note) for t in service.transitions(
            session=session, alert_id=alert_id)]  # fmt: skip
        assert history == [
            (
                "raised",
                None,
                "open",
                "system",
                "Wenzhou Lucheng: insurance pass rate below 65 % for 2 business days in a row (70.0 %, 60.0 %, 62.0 %)",
            ),
            ("escalated", "open", "open", "system", "not acknowledged within 24 h"),
            ("acknowledged", "open", "acknowledged", "sup-zj", "called the store"),
            ("resolved", "acknowledged", "resolved", "sup-zj", "staff retrained"),
        ]
        with pytest.raises(service.AlertError, match="already resolved"):
            service.resolve(session=session, alert_id=alert_id, user_id="sup-zj")


def test_timeliness_counts_acknowledgements_within_24_hours(chain: Engine) -> None:
    scenario(chain)
    ingest(chain, [e for d in (D1, D2, D3) for e in insurance_day(d, 1, 9, store_id="S003")])
    rule = seed_rule()
    for day in (D1, D2, D3):
        evaluate(chain, rule, day)
    since, until = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    with session_scope(chain) as session:
        alerts = {a.store_id: a for a in session.scalars(select(Alert))}
        assert set(alerts) == {"S001", "S003"}
        before = service.response_timeliness(session=session, since=since, until=until)
        assert (before.chain.numerator, before.chain.denominator) == (0, 2)
        late = alerts["S003"].raised_at + timedelta(hours=30)
        service.acknowledge(
            session=session, alert_id=alerts["S001"].id, user_id="u", now=alerts["S001"].raised_at + timedelta(hours=3)
        )
        service.acknowledge(session=session, alert_id=alerts["S003"].id, user_id="u", now=late)
    with session_scope(chain) as session:
        after = service.response_timeliness(session=session, since=since, until=until)
        assert (after.chain.numerator, after.chain.denominator) == (1, 2)
        assert after.by_region["R-ZJ"].ratio == 1.0 and after.by_region["R-SH"].ratio == 0.0
        assert after.by_store["S001"].ratio == 1.0
        only_zj = service.response_timeliness(session=session, since=since, until=until, region_id="R-ZJ")
        assert (only_zj.chain.numerator, only_zj.chain.denominator) == (1, 1)


def test_rule_files_load_as_versions_and_a_bad_file_stores_nothing(chain: Engine, tmp_path: Any) -> None:
    for path in RULES_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text("utf-8"), "utf-8")
    with session_scope(chain) as session:
        first = {r.kind: (r.version, r.created) for r in load_rules_dir(session=session, directory=tmp_path)}
    assert first["rule:pass_rate_watch"] == (1, True) and first["channels"] == (1, True)
    seed = (tmp_path / "pass_rate_watch.yaml").read_text("utf-8")
    (tmp_path / "pass_rate_watch.yaml").write_text(seed.replace("threshold_percent: 65", "threshold_percent: 60"))
    with session_scope(chain) as session:
        again = {r.kind: (r.version, r.created) for r in load_rules_dir(session=session, directory=tmp_path)}
        assert again["rule:pass_rate_watch"] == (2, True) and again["rule:dead_counter"] == (1, False)
        rule = stored_rule(session=session, rule_id="pass_rate_watch")
        assert rule is not None and rule.version == 2 and rule.params.threshold_percent == 60  # type: ignore[union-attr]
        enabled = {r.id for r in stored_rules(session=session, enabled_only=True)}
        assert "step_completeness_draft" not in enabled and "pass_rate_watch" in enabled
    (tmp_path / "dead_counter.yaml").write_text(seed.replace("threshold_percent: 65", "threshold_percent: 600"))
    (tmp_path / "pass_rate_watch.yaml").write_text(seed)
    with session_scope(chain) as session, pytest.raises(RuleDefinitionError, match=r"dead_counter.yaml:16: params"):
        load_rules_dir(session=session, directory=tmp_path)
    with session_scope(chain) as session:
        rule = stored_rule(session=session, rule_id="pass_rate_watch")
        assert rule is not None and rule.version == 2


def history(engine: Engine, days: int, first: date) -> None:
    """Deterministic random history: 3 stores' insurance checks, and footfall with dead spells on door-2."""
    rng = random.Random(20261204)
    with session_scope(engine) as session:
        session.add(Sensor(store_id="S001", sensor_id="door-2", name="side door"))
    events: list[dict[str, Any]] = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        for store in ("S001", "S002", "S003"):
            quality = rng.choice([0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
            checks = rng.randint(0, 8)
            fails = sum(rng.random() > quality for _ in range(checks))
            events += insurance_day(day, checks - fails, fails, store_id=store)
        for sensor in ("door-1", "door-2"):
            dead = sensor == "door-2" and (10 <= offset < 14 or 30 <= offset < 33 or offset == 40)
            if not dead:
                events.append({
                    "type": "footfall", "event_id": f"ff-{sensor}-{offset}", "store_id": "S001", "sensor_id": sensor,
                    "occurred_at": local(day, 12).isoformat(), "period_seconds": 900, "in": 30, "out": 30,
                })  # fmt: skip
    for start in range(0, len(events), 2000):
        ingest(engine, events[start : start + 2000])


@pytest.mark.parametrize("rule_name", ["pass_rate_watch", "dead_counter"])
def test_backtest_over_60_days_equals_live_evaluation_day_by_day(chain: Engine, rule_name: str) -> None:
    first = date(2026, 9, 1)
    days = 60
    history(chain, days, first)
    rule = seed_rule(rule_name)
    last = first + timedelta(days=days - 1)
    with session_scope(chain) as session:
        replayed = backtest(session=session, rule=rule, first=first, last=last)
        assert session.scalars(select(Alert)).all() == []  # back-testing writes nothing
    raised_on: dict[str, date] = {}
    for offset in range(days):
        day = first + timedelta(days=offset)
        for key in evaluate(chain, rule, day).raised:
            raised_on[key] = day
    with session_scope(chain) as session:
        live = session.scalars(select(Alert).order_by(Alert.id)).all()
        live_rows = sorted(
            (raised_on[a.dedup_key], a.store_id, a.subject, a.window_start, a.window_end, a.status == "resolved",
             len(a.evidence))
            for a in live
        )  # fmt: skip
    replay_rows = sorted(
        (a.raised_on, a.store_id, a.subject, a.window_start, a.window_end, a.resolved_on is not None, a.evidence_count)
        for a in replayed
    )
    assert len(replay_rows) >= 2, "the history should make the rule fire several times"
    assert replay_rows == live_rows
    if rule_name == "dead_counter":
        # door-2 was dead 4 and 3 days (alerts), then 1 day (too short); door-1 never.
        assert [(r[2], r[3]) for r in replay_rows] == [
            ("door-2", first + timedelta(days=10)), ("door-2", first + timedelta(days=30)),
        ]  # fmt: skip


def test_acknowledging_through_the_api_moves_timeliness_and_respects_scope(chain: Engine) -> None:
    import httpx

    from ingest.users import create_user
    from tests.conftest import LiveServer, make_app

    scenario(chain)
    ingest(chain, [e for d in (D1, D2, D3) for e in insurance_day(d, 1, 9, store_id="S003")])
    rule = seed_rule()
    for day in (D1, D2, D3):
        evaluate(chain, rule, day, now=datetime.now(UTC))  # raised now, so an acknowledgement now is timely
    with session_scope(chain) as session:
        tokens = {
            "sup_zj": create_user(
                session=session, user_id="sup-zj", name="周督导", role="supervisor", region_id="R-ZJ"
            ),
            "sup_sh": create_user(
                session=session, user_id="sup-sh", name="沈督导", role="supervisor", region_id="R-SH"
            ),
            "mgr_s002": create_user(
                session=session, user_id="mgr-s002", name="钱店长", role="manager", store_id="S002"
            ),
            "hq": create_user(session=session, user_id="hq-1", name="总部", role="headquarters"),
        }
        alert_ids = {a.store_id: a.id for a in session.scalars(select(Alert))}

    def call(method: str, path: str, who: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
        return httpx.request(method, f"{server.url}/api/v1{path}", headers=headers, timeout=10, **kwargs)

    today = datetime.now(SHANGHAI).date()
    window = {"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat()}
    with LiveServer(make_app(chain)) as server:
        assert call("GET", "/alerts", None).status_code == 401
        zj = call("GET", "/alerts", "sup_zj").json()["alerts"]
        assert [a["store_id"] for a in zj] == ["S001"]
        assert zj[0]["evidence"][0]["customer_name"] == "王建国" and not zj[0]["evidence_masked"]
        assert call("GET", "/alerts", "mgr_s002").json()["alerts"] == []
        assert call("GET", f"/alerts/{alert_ids['S001']}", "sup_sh").status_code == 403
        assert call("POST", f"/alerts/{alert_ids['S001']}/ack", "sup_sh", json={"note": "x"}).status_code == 403
        assert call("POST", f"/alerts/{alert_ids['S001']}/ack", "mgr_s002").status_code == 403
        # Both are younger than 24 h and not acknowledged yet: pending, neither in time nor late.
        assert call("GET", "/alerts/timeliness", "hq", params=window).json()["chain"] == {
            "acknowledged_within_24h": 0, "due": 0, "percent": None, "pending": 2,
        }  # fmt: skip
        acked = call("POST", f"/alerts/{alert_ids['S001']}/ack", "sup_zj", json={"note": "打电话给店长"})
        assert acked.status_code == 200 and acked.json()["status"] == "acknowledged"
        assert acked.json()["acknowledged_by"] == "sup-zj"
        assert call("POST", f"/alerts/{alert_ids['S001']}/ack", "sup_zj").status_code == 409
        chain_view = call("GET", "/alerts/timeliness", "hq", params=window).json()
        assert chain_view["chain"] == {"acknowledged_within_24h": 1, "due": 1, "percent": 100.0, "pending": 1}
        assert chain_view["by_region"]["R-ZJ"]["percent"] == 100.0 and "R-SH" not in chain_view["by_region"]
        own_region = call("GET", "/alerts/timeliness", "sup_sh", params=window).json()
        assert own_region["chain"]["due"] == 0 and own_region["by_store"] == {}  # S003's alert is pending
        assert own_region["chain"]["pending"] == 1
        detail = call("GET", f"/alerts/{alert_ids['S001']}", "sup_zj").json()
        assert [t["action"] for t in detail["transitions"]] == ["raised", "acknowledged"]
        assert detail["transitions"][1]["note"] == "打电话给店长"
        resolved = call("POST", f"/alerts/{alert_ids['S001']}/resolve", "hq", json={"note": "done"})
        assert resolved.status_code == 200 and resolved.json()["resolved_by"] == "hq-1"


def test_each_store_is_evaluated_for_its_own_last_closed_business_day(chain: Engine) -> None:
    """At 2026-11-20 02:00 UTC it is already the 20th in Shanghai but still the 19th in New York."""
    from ingest.models import Store

    now = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    with session_scope(chain) as session:
        shanghai = session.get(Store, "S001")
        assert shanghai is not None
        new_york = Store(
            store_id="S900", region_id="R-SH", name_zh="纽约店", name_en="New York", timezone="America/New_York"
        )
        session.add(new_york)
        session.flush()
        assert service.last_closed_day(shanghai, now) == date(2026, 11, 19)
        assert service.last_closed_day(new_york, now) == date(2026, 11, 18)
    # A streak in New York closing on the 18th raises when evaluated at that moment, with no `day` given.
    # insurance_day writes from 09:00 Shanghai time: 20:00 the evening before in New York.
    ingest(
        chain, [e for d in (date(2026, 11, 18), date(2026, 11, 19)) for e in insurance_day(d, 1, 9, store_id="S900")]
    )
    with session_scope(chain) as session:
        report = service.evaluate_rule(session=session, rule=seed_rule(), now=now, channels=CHANNELS)
    assert report.raised == ["pass_rate_watch|S900||2026-11-17"]
