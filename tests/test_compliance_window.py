"""A consultation id belongs to one consultation only within the window of the POS gate.

Tills reuse consultation ids (a counter per till, reset when the till is reinstalled). The
compliance hook, the checkout gate and the trace look at the steps of a consultation only
within CONSULTATION_WINDOW of the sale (or of the till's now): a month-old consultation with
the same id neither completes a new one nor is completed by it. On TimescaleDB the lookups
are bounded in time, so they read only the chunks of the window.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, select

from ingest.contract import STEPS
from ingest.db import session_scope
from ingest.service import ingest_payloads
from store_rules import counter
from store_rules.models import ComplianceViolation
from tests import factories as f
from tests.test_pos_api import CONTROLLED, STEP_DATA

DAY1 = datetime(2026, 10, 20, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
DAY31 = DAY1 + timedelta(days=30)


def steps(consultation_id: str, at: datetime, which: tuple[str, ...] = tuple(STEPS)) -> list[dict[str, Any]]:
    return [
        f.step(0, step=step, consultation_id=consultation_id, data=STEP_DATA[step] or None,
               event_id=f"{consultation_id}-{at:%m%d%H%M}-{step}", occurred_at=(at + timedelta(minutes=i)).isoformat())
        for i, step in enumerate(which)
    ]  # fmt: skip


def sale(receipt: int, consultation_id: str, at: datetime) -> dict[str, Any]:
    line = {"line_no": 1, "sku": CONTROLLED, "qty": 1, "unit_price": "42.80", "amount": "42.80"}
    return f.receipt(receipt, at=at, consultation_id=consultation_id) | {"lines": [line], "total": "42.80"}


def ingest(engine: Engine, events: list[dict[str, Any]]) -> None:
    with session_scope(engine) as session:
        results = ingest_payloads(events, session=session, source="test")
    assert {r.status for r in results} == {"accepted"}, [r.error for r in results]


def violations(engine: Engine) -> dict[str, tuple[list[str], bool]]:
    """receipt_id → (missing steps, resolved)."""
    with session_scope(engine) as session:
        rows = session.scalars(select(ComplianceViolation))
        return {v.receipt_id: (v.missing_steps, v.resolved_at is not None) for v in rows}


def test_a_consultation_id_reused_a_month_later_does_not_see_the_old_steps(chain: Engine) -> None:
    ingest(chain, [*steps("C1", DAY1), sale(1, "C1", DAY1 + timedelta(minutes=10))])
    assert violations(chain) == {}
    # A month later the till hands out C1 again; this time only two steps are recorded.
    ingest(chain, [*steps("C1", DAY31, ("consultation", "symptoms")), sale(2, "C1", DAY31 + timedelta(minutes=10))])
    later = ["recommendation", "insurance_check", "guidance"]
    assert violations(chain) == {"R2": (later, False)}
    with session_scope(chain) as session:
        refused = counter.checkout(
            session=session, store_id="S001", consultation_id="C1", skus=[CONTROLLED], now=DAY31 + timedelta(minutes=9)
        )
        assert (refused.allowed, [m["step"] for m in refused.missing]) == (False, later)
        assert "药品推荐、医保核验、用药指导" in (refused.message or {})["zh-CN"]
        then = counter.checkout(
            session=session, store_id="S001", consultation_id="C1", skus=[CONTROLLED], now=DAY1 + timedelta(minutes=9)
        )
        assert then.allowed
        new = counter.trace(session=session, store_id="S001", receipt_id="R2")
        old = counter.trace(session=session, store_id="S001", receipt_id="R1")
    assert new is not None and old is not None
    assert [s["step"] for s in new["consultation"]["steps"]] == ["consultation", "symptoms"]
    assert new["consultation"]["missing"] == later and new["violation"]["missing_steps"] == later
    assert [s["step"] for s in old["consultation"]["steps"]] == list(STEPS) and old["violation"] is None


def test_steps_of_a_reused_id_do_not_resolve_the_old_consultation_s_violation(chain: Engine) -> None:
    ingest(chain, [*steps("C2", DAY1, ("consultation",)), sale(3, "C2", DAY1 + timedelta(minutes=5))])
    assert violations(chain) == {"R3": (list(STEPS[1:]), False)}
    ingest(chain, [*steps("C2", DAY31), sale(4, "C2", DAY31 + timedelta(minutes=10))])
    assert violations(chain) == {"R3": (list(STEPS[1:]), False)}  # still open: a month later is another consultation
    # The missing steps of the first consultation, sent late by its till, resolve it.
    ingest(chain, steps("C2", DAY1 + timedelta(hours=3), tuple(STEPS[1:])))
    assert violations(chain) == {"R3": (list(STEPS[1:]), True)}


@contextmanager
def step_lookups(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs on consultation_steps the code runs inside the block, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM consultation_steps" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def chunks_read(engine: Engine, statement: str, parameters: Any) -> set[str]:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN " + statement, parameters)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    finally:
        raw.close()
    return set(re.findall(r"_hyper_\d+_\d+_chunk", plan))


def test_step_lookups_read_only_the_chunks_of_the_window(pg_chain: Engine) -> None:
    last = DAY1 + timedelta(days=39)
    # Forty days of consultations, one a day: forty daily chunks of consultation_steps.
    for day in range(39):
        ingest(pg_chain, steps(f"C-{day}", DAY1 + timedelta(days=day), ("consultation",)))
    ingest(pg_chain, steps("C7", last, ("consultation",)))
    window_chunks = 3  # two days either side of the sale: its day and the two before; the two after hold nothing
    with step_lookups(pg_chain) as sale_lookups:
        ingest(pg_chain, [sale(7, "C7", last + timedelta(minutes=5))])
    assert violations(pg_chain) == {"R7": (list(STEPS[1:]), False)}
    assert_within_window(pg_chain, sale_lookups, window_chunks)
    with step_lookups(pg_chain) as recheck_lookups:
        ingest(pg_chain, steps("C7", last + timedelta(minutes=1), ("symptoms",)))
    assert_within_window(pg_chain, recheck_lookups, window_chunks)
    with step_lookups(pg_chain) as till_lookups, session_scope(pg_chain) as session:
        found = counter.trace(session=session, store_id="S001", receipt_id="R7")
        gate = counter.checkout(
            session=session, store_id="S001", consultation_id="C7", skus=[CONTROLLED], now=last + timedelta(minutes=6)
        )
    assert found is not None and [s["step"] for s in found["consultation"]["steps"]] == ["consultation", "symptoms"]
    assert [m["step"] for m in gate.missing] == list(STEPS[2:])
    assert len(till_lookups) == 2
    assert_within_window(pg_chain, till_lookups, window_chunks)


def assert_within_window(engine: Engine, lookups: list[tuple[str, Any]], chunks: int) -> None:
    assert lookups
    assert [len(chunks_read(engine, statement, parameters)) for statement, parameters in lookups] == [chunks] * len(
        lookups
    )
