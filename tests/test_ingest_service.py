"""The ingest service and batch writers, on SQLite and on TimescaleDB."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Engine, func, select, text

from ingest.db import session_scope
from ingest.models import ConsultationStep, DeadLetter, Footfall, Receipt, ReceiptLine, StockLot
from ingest.service import ingest_payloads
from ingest.timeseries import hypertables
from tests import factories as f


def ingest(engine: Engine, payloads: list, **kwargs) -> list[tuple[str, str | None]]:
    with session_scope(engine) as session:
        results = ingest_payloads(payloads, session=session, source="test", **kwargs)
    return [(r.status, r.error) for r in results]


def count(engine: Engine, model: type) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_every_event_type_is_stored_with_its_raw_payload(chain: Engine) -> None:
    payloads = [f.receipt(1, till_firmware="4.2"), f.step(1), f.prompt_answer(1), f.footfall(1), f.stock(1)]
    assert ingest(chain, payloads) == [("accepted", None)] * 5
    with session_scope(chain) as session:
        receipt = session.scalars(select(Receipt)).one()
        assert receipt.raw["till_firmware"] == "4.2"
        assert receipt.occurred_at == datetime.fromisoformat(payloads[0]["occurred_at"])
        assert receipt.occurred_at.tzinfo is not None
        lines = session.scalars(select(ReceiptLine).order_by(ReceiptLine.line_no)).all()
        assert [line.amount for line in lines] == [Decimal(line["amount"]) for line in payloads[0]["lines"]]
        assert sum(line.amount for line in lines) == receipt.total
        step = session.scalars(select(ConsultationStep)).one()
        assert (step.customer_name, step.data) == ("王建国", {"result": "fail", "reason": "card expired"})
        footfall = session.scalars(select(Footfall)).one()
        assert (footfall.count_in, footfall.count_out, footfall.period_seconds) == (37, 31, 900)
        lots = session.scalars(select(StockLot).order_by(StockLot.lot)).all()
        assert [(lot.lot, lot.qty, str(lot.expires_on)) for lot in lots] == [
            ("B2409", 6, "2027-01-31"),
            ("B2410", 8, "2027-03-31"),
        ]


def test_redelivery_is_a_duplicate_and_changes_nothing(chain: Engine) -> None:
    batch = [f.receipt(n) for n in range(20)] + [f.stock(1)]
    assert {status for status, _ in ingest(chain, batch)} == {"accepted"}
    assert ingest(chain, batch) == [("duplicate", None)] * 21
    assert count(chain, Receipt) == 20
    assert count(chain, ReceiptLine) == 80
    assert count(chain, StockLot) == 2


def test_a_repeat_inside_one_batch_is_a_duplicate(chain: Engine) -> None:
    assert [s for s, _ in ingest(chain, [f.receipt(1), f.receipt(2), f.receipt(1)])] == [
        "accepted",
        "accepted",
        "duplicate",
    ]
    assert count(chain, ReceiptLine) == 8


def test_rejected_events_go_to_the_dead_letter_table_and_the_rest_is_stored(chain: Engine) -> None:
    bad_total = {**f.receipt(2), "total": "0.01"}
    results = ingest(chain, [f.receipt(1), bad_total, f.receipt(3, store_id="S999"), "oops", f.footfall(1)])
    assert [s for s, _ in results] == ["accepted", "rejected", "rejected", "rejected", "accepted"]
    assert results[2][1] == "store_id: unknown store 'S999'"
    assert count(chain, Receipt) == 1
    with session_scope(chain) as session:
        letters = session.scalars(select(DeadLetter).order_by(DeadLetter.id)).all()
        assert [letter.reason for letter in letters] == [results[1][1], results[2][1], results[3][1]]
        assert json.loads(letters[0].raw_payload) == bad_total
        assert letters[0].event_id == bad_total["event_id"]
        assert letters[1].store_id == "S999"
        assert letters[2].raw_payload == '"oops"'
        assert all(letter.source == "test" and letter.received_at.tzinfo for letter in letters)


def test_a_redelivered_bad_payload_is_dead_lettered_once(chain: Engine) -> None:
    bad = {**f.receipt(1), "total": "0.01"}
    ingest(chain, [bad])
    ingest(chain, [bad])
    ingest(chain, [{**bad, "total": "0.02"}])
    assert count(chain, DeadLetter) == 2


def test_a_device_token_store_only_publishes_for_itself(chain: Engine) -> None:
    results = ingest(chain, [f.receipt(1, store_id="S001"), f.receipt(2, store_id="S002")], allowed_store_id="S001")
    assert results[0] == ("accepted", None)
    assert results[1] == ("rejected", "store_id: this device token publishes for store 'S001' only")


def test_events_on_timescaledb_land_in_hypertables_with_the_chosen_chunks(pg_chain: Engine) -> None:
    with session_scope(pg_chain) as session:
        tables = hypertables(session)
    assert tables["receipt_lines"] == "1 day"
    assert tables["footfall"] == "7 days"
    assert set(tables) == {
        "receipts", "receipt_lines", "consultation_steps", "prompt_answers", "footfall", "stock_snapshots",
        "stock_lots",
    }  # fmt: skip


def test_an_event_the_postgres_path_cannot_store_is_dead_lettered_alone(pg_chain: Engine) -> None:
    # Unknown fields are kept in the jsonb raw column; nesting this deep cannot be serialised
    # there, so that one event is refused and the rest of its batch is still stored.
    nested: object = "deep"
    for _ in range(300):
        nested = {"x": nested}
    poisoned = f.receipt(2, vendor_blob=nested)
    results = ingest(pg_chain, [f.receipt(1), poisoned, f.receipt(3)])
    assert [s for s, _ in results] == ["accepted", "rejected", "accepted"]
    assert results[1][1] is not None and results[1][1].startswith("database: raw payload cannot be stored as JSON")
    assert count(pg_chain, Receipt) == 2
    assert count(pg_chain, ReceiptLine) == 8
    with session_scope(pg_chain) as session:
        letter = session.scalars(select(DeadLetter)).one()
        assert letter.event_id == poisoned["event_id"]
        assert '"vendor_blob"' in letter.raw_payload


def test_amounts_sum_exactly_per_store_and_day(chain: Engine) -> None:
    ingest(chain, [f.receipt(n, lines=3) for n in range(50)] + [f.receipt(99, kind="return", lines=2)])
    expected = sum(Decimal(r["total"]) for r in [f.receipt(n, lines=3) for n in range(50)]) + Decimal(
        f.receipt(99, kind="return", lines=2)["total"]
    )
    with session_scope(chain) as session:
        total = session.execute(text("SELECT sum(amount) FROM receipt_lines WHERE store_id = 'S001'")).scalar()
    assert round(Decimal(str(total)), 2) == expected
