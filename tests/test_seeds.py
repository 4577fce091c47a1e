"""The demo chain and the simulator: clean imports, realistic and deterministic events.

The database tests run on SQLite and on TimescaleDB (the `engine` fixture) and compute the
figures with SQL from what the ingest service stored, not from the simulator's own numbers.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, case, func, select

from ingest.contract import STEPS, parse_event
from ingest.db import session_scope
from ingest.masterdata import IMPORT_ORDER, import_file
from ingest.models import (
    ConsultationStep,
    Footfall,
    Member,
    PromptAnswer,
    Receipt,
    Region,
    Sensor,
    Sku,
    Staff,
    StockLot,
    Store,
    Terminal,
)
from ingest.service import ingest_payloads
from seeds.simulator import DEMO_CHAIN_DIR, Chain, LiveFeed, load_chain, load_history, simulate_day

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 20)  # a Friday
SHENSONG = "6901234567890"  # 参松养心胶囊


def import_chain(engine: Engine) -> dict[str, tuple[int, int, int]]:
    """Import every CSV of the demo chain in one session; kind → (rows, inserted, updated)."""
    out: dict[str, tuple[int, int, int]] = {}
    with session_scope(engine) as session:
        for kind in IMPORT_ORDER:
            for report in import_file(DEMO_CHAIN_DIR / f"{kind}.csv", session=session):
                assert report.errors == [], (kind, [str(e) for e in report.errors])
                assert report.written
                out[report.kind] = (report.rows, report.inserted, report.updated)
    return out


def table_counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Region, Store, Terminal, Sensor, Sku, Staff, Member)
        }


# --- master data ---------------------------------------------------------------------------


def test_demo_chain_imports_cleanly_and_reimport_updates(engine: Engine) -> None:
    first = import_chain(engine)
    assert {kind: inserted for kind, (_, inserted, _) in first.items()} == {
        "regions": 3, "stores": 12, "terminals": 29, "sensors": 17, "skus": 43, "staff": 52, "members": 200,
        "safety_stock": 48,  # 43 chain-wide rows and 5 of S001's own
        "source_mappings": 6,  # the stores of the public POSLog samples onto demo stores
    }  # fmt: skip
    counts = table_counts(engine)

    with session_scope(engine) as session:
        store = session.get(Store, "S001")
        assert store is not None and store.name_zh == "温州鹿城店" and store.timezone == "Asia/Shanghai"
        assert {r.name_zh for r in session.scalars(select(Region))} == {"浙江区", "上海区", "江苏区"}
        shensong = session.get(Sku, SHENSONG)
        assert shensong is not None and shensong.name_zh.startswith("参松养心胶囊")
        assert shensong.category == "cardio"
        assert shensong.prompt_triggering and shensong.flow_controlled and shensong.insurance_eligible
        skus = {s.name_zh.split()[0]: s for s in session.scalars(select(Sku))}
        amoxicillin = skus["阿莫西林胶囊"]
        assert amoxicillin.is_rx and amoxicillin.flow_controlled and amoxicillin.insurance_eligible
        assert amoxicillin.atc_code == "J01CA04"
        assert skus["硝苯地平缓释片"].is_rx and skus["盐酸二甲双胍片"].is_rx
        assert not skus["板蓝根颗粒"].is_rx and skus["感康"].category == "cold"
        for sku in skus.values():
            assert len(sku.sku) == 13 and sku.sku.isdigit() and sku.sku.startswith("69")
            assert sku.unit_price is not None and Decimal("1") <= sku.unit_price <= Decimal("500")
        for store_id in session.scalars(select(Store.store_id)):
            terminals = session.scalar(select(func.count()).where(Terminal.store_id == store_id))
            sensors = session.scalar(select(func.count()).where(Sensor.store_id == store_id))
            roles = Counter(session.scalars(select(Staff.role).where(Staff.store_id == store_id)))
            assert 2 <= (terminals or 0) <= 3 and 1 <= (sensors or 0) <= 2, store_id
            assert 3 <= sum(roles.values()) <= 6 and roles["manager"] == 1 and roles["pharmacist"] >= 1, store_id
            assert set(roles) <= {"manager", "pharmacist", "cashier"}

    again = import_chain(engine)
    assert all(inserted == 0 and updated == rows for rows, inserted, updated in again.values()), again
    assert table_counts(engine) == counts


# --- the simulator alone -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_chain() -> Chain:
    return load_chain()


def test_a_simulated_day_is_deterministic_and_follows_the_contract(demo_chain: Chain) -> None:
    events = simulate_day(demo_chain, "S001", DAY)
    assert events == simulate_day(demo_chain, "S001", DAY)
    assert events != simulate_day(demo_chain, "S001", DAY + timedelta(days=1))
    after = datetime.combine(DAY + timedelta(days=2), time(), SHANGHAI)
    for event in events:
        parse_event(event, now=after)
        assert event["occurred_at"].endswith("+08:00")
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    by_type = Counter(e["type"] for e in events)
    assert set(by_type) == {"receipt", "consultation_step", "prompt_answer", "footfall", "stock"}

    # Footfall: every sensor every 15 minutes from 08:00 to 21:45, with a morning and an evening peak.
    footfall = [e for e in events if e["type"] == "footfall"]
    assert len(footfall) == 2 * 14 * 4
    assert min(e["occurred_at"] for e in footfall) == "2026-11-20T08:00:00+08:00"
    assert max(e["occurred_at"] for e in footfall) == "2026-11-20T21:45:00+08:00"
    per_hour: Counter[int] = Counter()
    for e in footfall:
        per_hour[int(e["occurred_at"][11:13])] += e["in"]
    assert per_hour[18] > per_hour[14] and per_hour[10] > per_hour[13]
    visitors = sum(e["in"] for e in footfall)
    assert visitors == sum(e["out"] for e in footfall)

    receipts = [e for e in events if e["type"] == "receipt"]
    sales = [r for r in receipts if r["kind"] == "sale"]
    assert 0.2 <= len(sales) / visitors <= 0.4
    assert all(1 <= len(r["lines"]) <= 5 for r in sales)
    for receipt in receipts:
        total = sum(Decimal(line["amount"]) for line in receipt["lines"])
        assert Decimal(receipt["total"]) == total
        if receipt["kind"] == "return":
            assert all(line["qty"] < 0 and Decimal(line["amount"]) < 0 for line in receipt["lines"])

    # The counter flow: five steps in order before the sale, skips with reasons, insurance results.
    steps = [e for e in events if e["type"] == "consultation_step"]
    flows: dict[str, list[dict]] = {}
    for step in steps:
        flows.setdefault(step["consultation_id"], []).append(step)
    flow_skus = {s.sku for s in demo_chain.skus if s.flow_controlled}
    with_flow = [r for r in sales if any(line["sku"] in flow_skus for line in r["lines"])]
    assert {r["consultation_id"] for r in with_flow} == set(flows)
    for receipt in with_flow:
        flow = sorted(flows[receipt["consultation_id"]], key=lambda e: e["occurred_at"])
        assert [e["step"] for e in flow] == list(STEPS)
        assert flow[-1]["occurred_at"] < receipt["occurred_at"]
        assert flow[0]["customer"]["name"]
    skipped = [s for s in steps if s["status"] == "skipped"]
    assert skipped and all(s["skip_reason"] for s in skipped)
    assert {"顾客拒绝", "复购老方"} & {s["skip_reason"] for s in skipped}
    keywords = {k for s in steps if s["step"] == "symptoms" and s["data"] for k in s["data"]["keywords"]}
    assert keywords & {"胸闷", "心悸", "咳嗽", "发热"}
    results = Counter(s["data"]["result"] for s in steps if s["step"] == "insurance_check" and s["status"] == "done")
    assert results["pass"] / (results["pass"] + results["fail"]) < 0.65  # S001 fails too often

    # A scan-time prompt answer for every 参松养心胶囊 sold.
    sold = {(r["receipt_id"]) for r in sales if any(line["sku"] == SHENSONG for line in r["lines"])}
    answers = [e for e in events if e["type"] == "prompt_answer"]
    assert sold and {a["receipt_id"] for a in answers} == sold
    assert {a["answer"] for a in answers} <= {"doctor", "referral", "poster"}
    assert {a["prompt_id"] for a in answers} == {"recommendation_source"}

    # Stock: one snapshot per SKU before opening, lots with expiry dates.
    stock = [e for e in events if e["type"] == "stock"]
    assert sorted(e["sku"] for e in stock) == sorted(s.sku for s in demo_chain.skus)
    assert all(e["on_hand"] == sum(lot["qty"] for lot in e["lots"]) for e in stock)


def test_some_lots_expire_within_90_days(demo_chain: Chain) -> None:
    soon = 0
    for store in demo_chain.stores:
        for event in simulate_day(demo_chain, store.store_id, DAY):
            if event["type"] == "stock":
                for lot in event["lots"]:
                    left = (date.fromisoformat(lot["expires_on"]) - DAY).days
                    assert left > 0
                    soon += left <= 90
    assert soon >= 12


def test_a_day_cut_at_until_has_no_future_and_no_half_sales(demo_chain: Chain) -> None:
    until = datetime.combine(DAY, time(12, 7), SHANGHAI)
    events = simulate_day(demo_chain, "S002", DAY, until=until)
    assert events and all(datetime.fromisoformat(e["occurred_at"]) <= until for e in events)
    assert all(
        datetime.fromisoformat(e["occurred_at"]) + timedelta(seconds=e["period_seconds"]) <= until
        for e in events
        if e["type"] == "footfall"
    )
    full = simulate_day(demo_chain, "S002", DAY)
    ids = {e["event_id"] for e in events}
    assert ids < {e["event_id"] for e in full}  # the same ids as the whole day: a later load only adds
    receipts = {e["consultation_id"] for e in events if e["type"] == "receipt" and e["consultation_id"]}
    steps = Counter(e["consultation_id"] for e in events if e["type"] == "consultation_step")
    assert all(steps[c] == 5 for c in receipts)


def test_live_feed_trickles_valid_events_never_in_the_future(demo_chain: Chain) -> None:
    start = datetime.now(UTC).replace(microsecond=0)
    feed = LiveFeed(demo_chain, ["S001", "S005"], start=start)
    now = start + timedelta(seconds=60)
    batches = feed.events_until(now)
    assert set(batches) == {"S001", "S005"}
    for store_id, events in batches.items():
        for event in events:
            parse_event(event, now=now)
            assert event["store_id"] == store_id
            assert datetime.fromisoformat(event["occurred_at"]) <= now
        sales = [e for e in events if e["type"] == "receipt"]
        assert 60 / 8 - 1 <= len(sales) <= 60 / 2 + 1  # every 2-8 s
        visitors = sum(e["in"] for e in events if e["type"] == "footfall")
        assert 0.1 < len(sales) / visitors < 0.7
    all_ids = [e["event_id"] for events in batches.values() for e in events]
    assert len(all_ids) == len(set(all_ids))
    assert feed.events_until(now) == {}  # nothing twice
    later = feed.events_until(now + timedelta(seconds=30))
    assert not {e["event_id"] for events in later.values() for e in events} & set(all_ids)


# --- seven days through the ingest service ---------------------------------------------------


def test_seven_days_of_history_have_the_chain_s_figures(engine: Engine) -> None:
    import_chain(engine)
    chain = load_chain()
    now = datetime.now(UTC)
    report = load_history(engine, chain, days=7, now=now, include_today=False)
    assert report.store_days == 7 * 12
    assert report.rejected == 0, report.errors
    assert report.accepted == report.events > 7 * 12 * 300

    with session_scope(engine) as session:
        sales = dict(
            session.execute(
                select(Receipt.store_id, func.count()).where(Receipt.kind == "sale").group_by(Receipt.store_id)
            ).all()
        )
        visitors = dict(
            session.execute(select(Footfall.store_id, func.sum(Footfall.count_in)).group_by(Footfall.store_id)).all()
        )
        result = ConsultationStep.data["result"].as_string()
        checks = {
            store_id: (int(passed), int(failed))
            for store_id, passed, failed in session.execute(
                select(
                    ConsultationStep.store_id,
                    func.sum(case((result == "pass", 1), else_=0)),
                    func.sum(case((result == "fail", 1), else_=0)),
                )
                .where(ConsultationStep.step == "insurance_check", ConsultationStep.status == "done")
                .group_by(ConsultationStep.store_id)
            )
        }
        answers = set(session.scalars(select(PromptAnswer.answer).distinct()))
        today = now.astimezone(SHANGHAI).date()
        expiring = session.scalar(
            select(func.count())
            .select_from(StockLot)
            .where(StockLot.expires_on <= today + timedelta(days=90), StockLot.occurred_at >= now - timedelta(days=2))
        )

    assert len(sales) == len(visitors) == len(checks) == 12
    for store_id in sorted(sales):
        conversion = sales[store_id] / int(visitors[store_id])
        assert 0.20 <= conversion <= 0.40, (store_id, conversion)
        passed, failed = checks[store_id]
        rate = passed / (passed + failed)
        if store_id == "S001":
            assert rate < 0.65, rate
        else:
            assert rate >= 0.70, (store_id, rate)
    assert answers == {"doctor", "referral", "poster"}
    assert expiring and expiring > 0

    # Simulating one of those days again stores nothing new.
    day = now.astimezone(SHANGHAI).date() - timedelta(days=3)
    again = simulate_day(chain, "S001", day)
    with session_scope(engine) as session:
        results = ingest_payloads(again, session=session, source="simulator", now=now)
    assert Counter(r.status for r in results) == {"duplicate": len(again)}
