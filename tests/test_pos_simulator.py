"""The POS-driving till of the demo against the real app served by uvicorn, on SQLite and TimescaleDB.

The database holds the demo chain and the shipped flow / prompt definitions, as in
`storepulse demo`. What the till did is checked against what the server stored and answered
(an httpx response hook counts the 409s on the wire), not only against the till's own notes.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest.contract import STEPS
from ingest.db import session_scope
from ingest.models import ConsultationStep, PromptAnswer, Receipt
from ingest.tokens import create_token
from seeds.demo import import_demo_chain, pos_tills, post_live_events
from seeds.pos_till import RUSH_SKIP_REASONS, PosTill, TillSale
from seeds.simulator import SKIP_REASONS, Chain, LiveFeed, load_chain
from store_rules.definitions import CONFIG_DIR, FlowDefinition, active_flow, load_config_dir, parse_definition
from store_rules.models import ComplianceViolation
from tests.conftest import LiveServer, empty_tables, make_app

SHENSONG = "6901234567890"  # 参松养心胶囊: flow-controlled and prompt-triggering
SALES = 40
SEED = "pos-till-5"  # 40 sales: 13 with the flow, 4 checkouts blocked first, 2 with 参松养心胶囊


@pytest.fixture(scope="module")
def demo_chain() -> Chain:
    return load_chain()


def prepare(engine: Engine) -> None:
    """The demo chain's master data and the shipped definitions, as `storepulse demo` loads them."""
    import_demo_chain(engine)
    with session_scope(engine) as session:
        load_config_dir(session=session)


def token(engine: Engine, store_id: str) -> str:
    with session_scope(engine) as session:
        return create_token(session=session, store_id=store_id, name=f"pos-till-{store_id}").token


@pytest.fixture
def demo_db(engine: Engine) -> Engine:
    prepare(engine)
    return engine


@pytest.fixture
def server(demo_db: Engine) -> Iterator[LiveServer]:
    with LiveServer(make_app(demo_db)) as live:
        yield live


def run_till(engine: Engine, server: LiveServer, chain: Chain, end: datetime) -> tuple[list[TillSale], Counter[str]]:
    """Ring up SALES sales at S001 T1; returns them and the POS answers seen on the wire (path, status)."""
    wire: Counter[str] = Counter()

    def count(response: httpx.Response) -> None:
        wire[f"{response.request.url.path.rsplit('/', 1)[-1]} {response.status_code}"] += 1

    with PosTill(
        server.url, token(engine, "S001"), chain, "S001", "T1", rng=random.Random(SEED), early_checkout_rate=0.3
    ) as till:
        till.client.event_hooks["response"].append(count)
        return till.run(SALES, end=end), wire


def test_the_shipped_skip_reasons_are_all_listed_in_the_flow() -> None:
    flow = parse_definition("counter_flow", (CONFIG_DIR / "counter_flow.yaml").read_text("utf-8"))
    assert isinstance(flow, FlowDefinition)
    for table in (SKIP_REASONS, RUSH_SKIP_REASONS):
        assert set(table) == set(STEPS)
        for step, reasons in table.items():
            for reason in reasons:
                assert flow.skip_reason_problem(reason) is None, (step, reason)


def test_pos_driven_sales_pass_the_gate_leave_a_complete_trace_and_no_violation(
    demo_db: Engine, server: LiveServer, demo_chain: Chain
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    sales, wire = run_till(demo_db, server, demo_chain, now)
    assert len(sales) == SALES and all(s.receipt_status == "accepted" for s in sales)
    flow_codes = {s.sku for s in demo_chain.skus if s.flow_controlled}
    flow_sales = [s for s in sales if s.consultation_id]
    # The server decides which SKUs need the flow; for the demo chain it agrees with the master-data flag.
    assert [s.receipt_id for s in flow_sales] == [s.receipt_id for s in sales if flow_codes & set(s.skus)]
    assert len(flow_sales) >= 5
    assert wire["scan 200"] == sum(len(s.skus) for s in sales)
    assert wire["checkout 200"] == SALES

    # Some checkouts were refused first (409 on the wire), and every one of them then went through.
    blocked = [s for s in sales if s.blocked]
    assert blocked and wire["checkout 409"] == len(blocked)
    assert all(s.checkouts == [200] for s in sales if not s.blocked)
    for sale in blocked:
        assert sale.checkouts == [409, 200] and sale.blocked is not None
        after = sale.steps[len(sale.steps) - len(sale.blocked.missing) :]
        assert tuple(step for step, _, _ in after) == sale.blocked.missing
        assert "需要先完成或跳过" in sale.blocked.message["zh-CN"]
        assert sorted([*sale.blocked.completed, *(step for step, _ in sale.blocked.skipped)]) == sorted(
            sale.blocked.missing
        )
        assert sale.blocked.describe().startswith(f"S001 T1 receipt {sale.receipt_id}: checkout blocked (missing ")

    with session_scope(demo_db) as session:
        flow = active_flow(session=session)
        assert flow.version == 1
        assert list(session.scalars(select(ComplianceViolation))) == []
        receipts = {r.receipt_id: r for r in session.scalars(select(Receipt).where(Receipt.store_id == "S001"))}
        steps = list(session.scalars(select(ConsultationStep).where(ConsultationStep.store_id == "S001")))
        answers = list(session.scalars(select(PromptAnswer).where(PromptAnswer.store_id == "S001")))
    assert set(receipts) == {s.receipt_id for s in sales}
    by_consultation: dict[str, list[ConsultationStep]] = {}
    for row in steps:
        by_consultation.setdefault(row.consultation_id, []).append(row)
    assert set(by_consultation) == {s.consultation_id for s in flow_sales}
    for sale in flow_sales:
        receipt = receipts[sale.receipt_id]
        assert receipt.consultation_id == sale.consultation_id and receipt.terminal_id == "T1"
        rows = sorted(by_consultation[sale.consultation_id or ""], key=lambda r: r.occurred_at)
        # All five steps, in order, each done with its data or skipped with a listed reason, before the sale.
        assert [r.step for r in rows] == list(STEPS), sale.receipt_id
        assert rows[-1].occurred_at < receipt.occurred_at
        assert len({r.occurred_at for r in rows}) == 5
        for row in rows:
            assert row.staff_id
            if row.status == "skipped":
                assert flow.skip_reason_problem(row.skip_reason) is None
            else:
                assert flow.step(row.step).data_problem(row.data) is None  # type: ignore[union-attr]
    done = Counter((r.step, r.status) for r in steps)
    assert done["symptoms", "done"] and done["insurance_check", "done"] and done["recommendation", "done"]
    results = Counter((r.data or {}).get("result") for r in steps if r.step == "insurance_check" and r.status == "done")
    assert set(results) <= {"pass", "fail"}
    keywords = {k for r in steps if r.step == "symptoms" and r.data for k in r.data["keywords"]}
    assert keywords & {"胸闷", "心悸", "咳嗽", "发热", "口渴", "咳痰", "乏力"}

    # Nothing in the future: every time the till sent is at or before its sale, and the sale at or before now.
    for sale in sales:
        assert sale.timestamps == sorted(sale.timestamps) and sale.timestamps[-1] == sale.at <= now
        assert len(set(sale.timestamps)) == len(sale.timestamps)

    # A prompt answer was stored for every 参松养心胶囊 sold, one of the prompt's options.
    shensong = [s for s in sales if SHENSONG in s.skus]
    assert shensong
    assert {(a.receipt_id, a.sku, a.prompt_id) for a in answers} == {
        (s.receipt_id, SHENSONG, "recommendation_source") for s in shensong
    }
    assert {a.answer for a in answers} <= {"doctor", "referral", "poster"}
    assert all(a.staff_id and a.occurred_at < receipts[a.receipt_id].occurred_at for a in answers)

    # The trace of a 参松养心胶囊 sale follows it back to the first contact.
    sale = next((s for s in shensong if s.blocked), shensong[0])
    with httpx.Client(headers={"Authorization": f"Bearer {token(demo_db, 'S001')}"}) as client:
        trace = client.get(f"{server.url}/api/v1/stores/S001/receipts/{sale.receipt_id}/trace").json()
    assert trace["receipt"]["receipt_id"] == sale.receipt_id
    assert [line["sku"] for line in trace["receipt"]["lines"]] == sale.skus
    consultation = trace["consultation"]
    assert consultation["consultation_id"] == sale.consultation_id
    assert [s["step"] for s in consultation["steps"]] == list(STEPS)
    assert consultation["missing"] == [] and consultation["out_of_order"] == []
    assert consultation["first_contact"]["step"] == "consultation" and consultation["first_contact"]["staff_id"]
    assert consultation["customer"]["name"]
    assert [(a["sku"], a["answer"]) for a in trace["prompt_answers"]] == [
        (sku, answer) for sku, _, answer in sale.prompt_answers
    ]
    assert trace["violation"] is None


def test_the_till_is_deterministic(demo_db: Engine, server: LiveServer, demo_chain: Chain) -> None:
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)

    def summary(sales: list[TillSale]) -> list[tuple[object, ...]]:
        return [(s.receipt_id, s.skus, s.steps, s.prompt_answers, s.checkouts, s.timestamps) for s in sales]

    first, _ = run_till(demo_db, server, demo_chain, end)
    empty_tables(demo_db)
    prepare(demo_db)
    second, _ = run_till(demo_db, server, demo_chain, end)
    assert summary(first) == summary(second)


def test_the_server_decides_which_skus_need_the_flow(demo_db: Engine, server: LiveServer, demo_chain: Chain) -> None:
    """A till whose master data flags nothing still runs the flow wherever the scan asks for it."""
    unflagged = dataclasses.replace(
        demo_chain, skus=tuple(dataclasses.replace(s, flow_controlled=False) for s in demo_chain.skus)
    )
    now = datetime.now(UTC).replace(microsecond=0)
    with PosTill(server.url, token(demo_db, "S001"), unflagged, "S001", "T1", rng=random.Random(SEED)) as till:
        sales = till.run(20, end=now)
    flow_codes = {s.sku for s in demo_chain.skus if s.flow_controlled}
    assert [s.consultation_id is not None for s in sales] == [bool(flow_codes & set(s.skus)) for s in sales]
    assert any(s.consultation_id for s in sales)
    for sale in sales:
        assert sale.timestamps == sorted(set(sale.timestamps)) and sale.timestamps[-1] == sale.at
        assert sale.at <= now + timedelta(minutes=5)  # closes after its steps, well within the contract's 10 min
    with session_scope(demo_db) as session:
        assert list(session.scalars(select(ComplianceViolation))) == []


def test_the_live_feed_hands_pos_tills_their_sales_and_the_demo_loop_rings_them_up(
    demo_db: Engine, server: LiveServer, demo_chain: Chain
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    tokens = {store_id: token(demo_db, store_id) for store_id in ("S001", "S002", "S005")}
    tills = pos_tills(server.url, demo_chain, tokens, start, (("S001", "T1"), ("S005", "T1"), ("S002", "T9")))
    assert set(tills) == {("S001", "T1"), ("S005", "T1")}  # S002 has no T9
    feed = LiveFeed(demo_chain, ["S001", "S002", "S005"], start=start, pos_terminals={"S001": ["T1"], "S005": ["T1"]})
    with httpx.Client(base_url=server.url) as client:
        counts = post_live_events(client, feed, tokens, now=start + timedelta(minutes=3), tills=tills)
    for till in tills.values():
        till.close()
    assert counts["rejected"] == 0 and counts["pos_sales"] > 10
    assert counts["pos_sales"] == sum(till.stats["sales"] for till in tills.values())

    with session_scope(demo_db) as session:
        by_till = Counter((s, t) for s, t in session.execute(select(Receipt.store_id, Receipt.terminal_id)))
        violations = list(session.scalars(select(ComplianceViolation)))
        consultations = session.execute(
            select(ConsultationStep.store_id, ConsultationStep.terminal_id, ConsultationStep.consultation_id).distinct()
        ).all()
    assert by_till["S001", "T1"] == tills["S001", "T1"].stats["sales"] > 0
    assert by_till["S005", "T1"] == tills["S005", "T1"].stats["sales"] > 0
    assert by_till["S001", "T2"] + by_till["S001", "T3"] > 0  # the other tills still post their receipts
    assert by_till["S002", "T1"] > 0
    assert violations == []
    for (store_id, terminal_id), till in tills.items():
        assert sum(1 for s, t, _ in consultations if (s, t) == (store_id, terminal_id)) == till.stats["flow_sales"]
