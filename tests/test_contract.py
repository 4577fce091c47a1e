"""The event contract of CONTRACT.md: each rule and the message a till developer sees."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from ingest.contract import ContractError, ReceiptEvent, parse_event
from tests import factories as f

NOW = datetime(2026, 11, 22, 2, 30, tzinfo=UTC)


def rejected(payload: Any) -> str:
    with pytest.raises(ContractError) as info:
        parse_event(payload, now=NOW)
    return str(info.value)


def test_contract_examples_are_accepted() -> None:
    example_receipt = {
        "type": "receipt", "event_id": "S001-T1-20261122-0042", "store_id": "S001", "terminal_id": "T1",
        "receipt_id": "20261122-0042", "occurred_at": "2026-11-22T10:15:03+08:00", "kind": "sale",
        "staff_id": "E0101", "member_id": "M88812", "consultation_id": "C-7f3a",
        "lines": [{"line_no": 1, "sku": "6901234567890", "qty": 2, "unit_price": "36.80", "amount": "73.60",
                   "promotion_id": None}],
        "total": "73.60",
    }  # fmt: skip
    event = parse_event(example_receipt, now=NOW)
    assert isinstance(event, ReceiptEvent)
    assert event.occurred_at == datetime(2026, 11, 22, 2, 15, 3, tzinfo=UTC)
    assert str(event.total) == "73.60"
    for payload in (f.step(1), f.footfall(1), f.prompt_answer(1), f.stock(1), f.receipt(3, kind="return")):
        assert parse_event(payload, now=NOW).event_id == payload["event_id"]


def test_unknown_fields_are_kept_not_an_error() -> None:
    payload = f.receipt(1, till_firmware="4.2.1")
    event = parse_event(payload, now=NOW)
    assert event.model_extra == {"till_firmware": "4.2.1"}


def test_naive_timestamp_is_rejected() -> None:
    payload = f.receipt(1)
    payload["occurred_at"] = "2026-11-22T10:15:03"
    assert rejected(payload) == ("occurred_at: '2026-11-22T10:15:03' has no UTC offset; naive timestamps are rejected")


def test_more_than_ten_minutes_in_the_future_is_rejected_but_nine_is_fine() -> None:
    payload = f.receipt(1, at=NOW + timedelta(minutes=11))
    assert "occurred_at:" in rejected(payload)
    assert "more than 10 minutes in the future" in rejected(payload)
    assert parse_event(f.receipt(1, at=NOW + timedelta(minutes=9)), now=NOW)


def test_implausibly_old_timestamps_are_rejected() -> None:
    payload = f.receipt(1)
    payload["occurred_at"] = "0001-01-01T00:00:00+14:00"
    assert rejected(payload) == "occurred_at: '0001-01-01T00:00:00+14:00' is before 2000; a till clock is wrong"


def test_free_form_text_must_be_storable() -> None:
    payload = f.receipt(1, note="a\u0000b")
    assert rejected(payload) == "note: text with a NUL character or an unpaired surrogate cannot be stored"
    payload = f.step(1, step="symptoms")
    payload["data"] = {"keywords": ["胸闷", "\ud800"]}
    assert rejected(payload).startswith("data.keywords[1]: text with a NUL")


def test_total_must_equal_sum_of_lines() -> None:
    payload = f.receipt(1)
    payload["total"] = "1.00"
    assert rejected(payload).startswith("total: 1.00 is not the sum of line amounts")


def test_amounts_have_at_most_two_decimals_quantities_three() -> None:
    payload = f.receipt(1, lines=1)
    payload["lines"][0]["amount"] = "13.505"
    assert rejected(payload) == "lines[0].amount: amount '13.505' has more than 2 decimals"
    payload = f.receipt(1, lines=1)
    payload["lines"][0].update(qty="0.5", amount="6.75", unit_price="13.50")
    payload["total"] = "6.75"
    event = parse_event(payload, now=NOW)
    assert isinstance(event, ReceiptEvent) and event.lines[0].qty == Decimal("0.5")
    payload["lines"][0]["qty"] = "0.1234"
    assert rejected(payload) == "lines[0].qty: quantity '0.1234' has more than 3 decimals"


def test_amounts_may_be_numbers_but_not_booleans() -> None:
    payload = f.receipt(1, lines=1)
    payload["lines"][0]["unit_price"] = True
    assert rejected(payload) == "lines[0].unit_price: amount must be a decimal string or a number"


def test_skip_needs_a_reason() -> None:
    payload = f.step(1, step="symptoms", status="skipped")
    payload["skip_reason"] = "  "
    assert rejected(payload) == "skip_reason: a skipped step needs a reason"


def test_step_and_status_must_be_known() -> None:
    assert rejected(f.step(1, step="payment")).startswith("step: Input should be 'consultation'")
    assert rejected(f.step(1, status="maybe")).startswith("status: Input should be 'done' or 'skipped'")


def test_insurance_check_done_needs_pass_or_fail() -> None:
    payload = f.step(1)
    payload["data"] = {"result": "ok"}
    assert rejected(payload) == "data.result: insurance_check needs 'pass' or 'fail'"


def test_return_lines_are_negative() -> None:
    payload = f.receipt(1, kind="return")
    payload["lines"][1]["qty"] = 2
    assert rejected(payload) == "lines[1]: return lines need a negative qty and amount"


def test_missing_and_unknown_type() -> None:
    payload = f.receipt(1)
    del payload["store_id"]
    assert rejected(payload) == "store_id: required"
    assert rejected({"event_id": "x"}) == "type: required"
    assert rejected({**f.receipt(1), "type": "sale"}).startswith("type: unknown event type 'sale'")
    assert rejected([1, 2]) == "event: must be a JSON object, got list"


def test_event_id_length() -> None:
    assert rejected({**f.footfall(1), "event_id": "x" * 65}).startswith("event_id: String should have at most 64")
    assert rejected({**f.footfall(1), "event_id": ""}).startswith("event_id: String should have at least 1")


def test_footfall_counts_are_not_negative_and_keep_their_contract_names() -> None:
    event = parse_event(f.footfall(1, count_in=5, count_out=2), now=NOW)
    assert (event.count_in, event.count_out) == (5, 2)  # type: ignore[union-attr]
    assert rejected(f.footfall(1, count_in=-1)) == "in: Input should be greater than or equal to 0"


def test_stock_lots_are_dated_and_unique() -> None:
    payload = f.stock(1)
    payload["lots"][1]["lot"] = payload["lots"][0]["lot"]
    assert rejected(payload) == "lots: the same lot appears twice"
    payload = copy.deepcopy(f.stock(1))
    payload["lots"][0]["expires_on"] = "31/01/2027"
    assert rejected(payload).startswith("lots[0].expires_on:")
