"""The fast path of the contract accepts exactly what the pydantic models accept, builds the same events,
and leaves every error to the models, so a till developer reads the same message either way.

Each payload goes through `parse_event` twice: as the worker runs it (fast path first) and with the
models only. Both must give the same event (type, dump, JSON dump, the fields that were set and the
unknown fields kept, nested objects included) or the same ContractError text.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ingest.contract import ContractError, ReceiptEvent, parse_event
from ingest.fast_contract import FAST_TYPES, models_only, parse_fast
from tests import factories as f

NOW = datetime(2026, 11, 22, 2, 30, tzinfo=UTC)
AT = NOW - timedelta(hours=3)


def outcome(payload: Any, *, prices_include_tax: bool | None = None) -> Any:
    try:
        return parse_event(copy.deepcopy(payload), now=NOW, prices_include_tax=prices_include_tax)
    except ContractError as exc:
        return f"ContractError: {exc}"


def shape(value: Any) -> Any:
    """Everything a reader of the event can see, nested models included."""
    if isinstance(value, BaseModel):
        return (
            type(value).__name__,
            repr(value),
            value.model_dump(),
            value.model_dump(mode="json", by_alias=True),
            sorted(value.model_fields_set),
            value.model_extra,
            {name: shape(getattr(value, name)) for name in type(value).model_fields},
        )
    if isinstance(value, list):
        return [shape(item) for item in value]
    return value


def assert_same(payload: Any, *, prices_include_tax: bool | None = None) -> Any:
    fast = outcome(payload, prices_include_tax=prices_include_tax)
    with models_only():
        slow = outcome(payload, prices_include_tax=prices_include_tax)
    assert shape(fast) == shape(slow)
    return fast


def till_receipt(**fields: Any) -> dict[str, Any]:
    return f.till_receipt("B1", AT, **fields)


def discounted_return() -> dict[str, Any]:
    return f.discounted_return("R9", AT)


VALID: list[dict[str, Any]] = [
    f.receipt(1, at=AT),
    f.receipt(2, at=AT, kind="return"),
    f.receipt(3, at=AT, lines=1, till_firmware="4.2.1", meta={"lane": 3, "tags": ["a", "b"]}),
    f.receipt(4, at=AT, lines=1000),
    {**f.receipt(5, at=AT), "occurred_at": "2026-11-22T10:15:03.250+08:00"},
    {**f.receipt(6, at=AT), "occurred_at": "2026-11-21T20:00:00Z", "member_id": "M88812", "consultation_id": "C-7"},
    till_receipt(),
    till_receipt(prices_include_tax=True, total="21.41"),
    till_receipt(tenders=None, source=None, discounts=[], total="24.20"),
    discounted_return(),
    {**f.receipt(7, at=AT), "tax": "3.10", "tenders": [{"type": "wechat", "amount": "142.00", "ref": "wx1"}]},
    {**f.receipt(8, at=AT, lines=1), "rounding": "0.00"},
    f.footfall(1),
    {**f.footfall(2), "battery": 87},
    f.step(1),
    f.step(2, step="symptoms", data={"keywords": ["cough", "咳嗽"], "note": "dry"}),
    f.step(3, step="recommendation", status="skipped", skip_reason="customer in a hurry"),
    {**f.step(4), "customer": {"member_id": "M1", "name": "王建国", "tier": "gold"}, "device": "pad-2"},
    {**f.step(5, step="guidance"), "customer": None, "staff_id": None, "data": None},
    f.prompt_answer(1),
    f.stock(1),
]


@pytest.mark.parametrize("payload", VALID, ids=lambda p: f"{p['type']}-{p['event_id']}")
def test_valid_payloads_give_the_same_event_and_the_fast_path_takes_them(payload: dict[str, Any]) -> None:
    event = assert_same(payload)
    assert not isinstance(event, str), event
    assert event.event_id == payload["event_id"]
    if payload["type"] in ("receipt", "footfall", "consultation_step"):
        assert parse_fast(copy.deepcopy(payload), now=NOW) is not None


def test_the_fast_path_covers_receipts_footfall_and_steps_with_todays_contract() -> None:
    # Empty when contract_models.py gained or reordered a field: update ingest/fast_contract.py, then this test.
    assert sorted(FAST_TYPES) == ["consultation_step", "footfall", "receipt"]


def test_the_chain_default_decides_receipts_that_do_not_say() -> None:
    payload = till_receipt()
    del payload["prices_include_tax"]
    assert isinstance(assert_same(payload, prices_include_tax=False), ReceiptEvent)
    assert assert_same(payload, prices_include_tax=True).startswith(
        "ContractError: total: 22.70 does not reconcile; expected 21.41 = net sales 21.50"
    )
    assert isinstance(assert_same(till_receipt(total="21.41"), prices_include_tax=True), str)


def with_value(payload: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(payload)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return changed


def without(payload: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    changed = copy.deepcopy(payload)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return changed


R = f.receipt(1, at=AT)
BROKEN: list[tuple[dict[str, Any] | Any, str]] = [
    (with_value(R, ("event_id",), " "), "event_id: String should have at least 1 character"),
    (with_value(R, ("event_id",), "x" * 65), "event_id: String should have at most 64 characters"),
    (with_value(R, ("store_id",), "S\x00"), "store_id: String should match pattern '^[^\\x00]*$'"),
    (with_value(R, ("lines", 0, "sku"), "a\ud800"), "lines[0].sku: Input should be a valid string, unable to parse "
     "raw data as a unicode string"),
    (with_value(R, ("lines", 1, "line_no"), 1), "lines[1].line_no: duplicate line number 1"),
    (with_value(R, ("lines", 0, "unit_price"), "1.234"), "lines[0].unit_price: amount '1.234' has more than 2 "
     "decimals"),
    (with_value(R, ("lines", 0, "qty"), "1.2345"), "lines[0].qty: quantity '1.2345' has more than 3 decimals"),
    (with_value(R, ("total",), "1e11"), "total: amount '1e11' is out of range"),
    (with_value(R, ("total",), "NaN"), "total: amount must be finite"),
    (with_value(R, ("total",), "1.00"), "total: 1.00 is not the sum of line amounts (119.00)"),
    (with_value(R, ("occurred_at",), "2026-11-22T10:15:03"), "occurred_at: '2026-11-22T10:15:03' has no UTC offset; "
     "naive timestamps are rejected"),
    (with_value(R, ("occurred_at",), "1999-12-31T23:00:00Z"), "occurred_at: '1999-12-31T23:00:00Z' is before 2000; "
     "a till clock is wrong"),
    (with_value(R, ("occurred_at",), (NOW + timedelta(minutes=11)).isoformat()),
     "occurred_at: '2026-11-22T02:41:00+00:00' is more than 10 minutes in the future"),
    (with_value(R, ("kind",), "return"), "lines[0]: return lines need a negative qty and amount"),
    (with_value(R, ("lines",), []), "lines: List should have at least 1 item after validation, not 0"),
    (without(R, ("terminal_id",)), "terminal_id: required"),
    (with_value(R, ("note",), "a\x00b"), "note: text with a NUL character or an unpaired surrogate cannot be stored"),
    (till_receipt(tax="-1.29"), "tax: -1.29 must be 0 or positive on a sale"),
    (with_value(till_receipt(), ("lines", 0, "discount"), "21.00"), "lines[0]: discount: 21.00 must have the sign of "
     "the line amount (20.00) and be no larger than it"),
    (with_value(till_receipt(), ("discounts", 0, "kind"), "gift"), "discounts[0].kind: Input should be 'discount', "
     "'reward' or 'coupon'"),
    (with_value(till_receipt(), ("discounts", 0, "amount"), "-1.00"), "discounts[0].amount: -1.00 must be 0 or "
     "positive on a sale"),
    (with_value(till_receipt(), ("discounts", 0, "amount"), "30.00"), "discounts: the discounts (33.00) exceed the "
     "line amounts (25.50)"),
    (with_value(till_receipt(), ("tenders", 0, "type"), ""), "tenders[0].type: String should have at least 1 "
     "character"),
    (with_value(till_receipt(), ("source", "sequence"), "9" * 65), "source: 'sequence' must be text of "
     "at most 64 characters"),
    (without(till_receipt(), ("source", "name")), "source.name: required"),
    (with_value(till_receipt(), ("prices_include_tax",), "maybe"), "prices_include_tax: Input should be a valid "
     "boolean, unable to interpret input"),
    (with_value(till_receipt(), ("rounding",), "0.001"), "rounding: amount '0.001' has more than 2 decimals"),
    (with_value(f.footfall(1), ("in",), -1), "in: Input should be greater than or equal to 0"),
    (with_value(f.footfall(1), ("period_seconds",), 0), "period_seconds: Input should be greater than 0"),
    (f.step(1, status="skipped", skip_reason="  "), "skip_reason: a skipped step needs a reason"),
    (with_value(f.step(1), ("data", "result"), "maybe"), "data.result: insurance_check needs 'pass' or 'fail'"),
    (with_value(f.step(1), ("data", "keywords"), "cough"), "data.keywords: must be a list of strings"),
    (with_value(f.step(1), ("data", "x"), "\ud800"), "data.x: text with a NUL character or an unpaired surrogate "
     "cannot be stored"),
    (["not", "an", "object"], "event: must be a JSON object, got list"),
    ({**R, "type": "sale"}, "type: unknown event type 'sale' (expected one of receipt, consultation_step, "
     "prompt_answer, footfall, stock)"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "message"), BROKEN, ids=[m[:40] for _, m in BROKEN])
def test_every_broken_rule_gives_the_models_message(payload: Any, message: str) -> None:
    result = assert_same(payload)
    assert isinstance(result, str)
    assert message in result


def test_values_the_models_coerce_are_coerced_alike() -> None:
    # Unusual but valid spellings leave the fast path; the models read them as before.
    for path, value in [
        (("lines", 0, "qty"), 2.0),
        (("lines", 0, "line_no"), True),
        (("lines", 0, "line_no"), "1"),
        (("store_id",), " S001 "),
        (("total",), " 119.00 "),
        (("total",), "1.19E+2"),
        (("lines", 0, "unit_price"), "١٣.٥٠"),
    ]:
        event = assert_same(with_value(R, path, value))
        assert not isinstance(event, str), (path, value, event)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found.extend(paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            found.append((*prefix, index))
            found.extend(paths(item, (*prefix, index)))
    return found


ODD_VALUES = st.one_of(
    st.sampled_from(
        [
            None, "", " ", "x", " x", "x ", "x\x00", "\ud800", "\x1c", "Z", "１２", "0", "-0", "0.00", "-0.00",
            "1", "-1", "1.5", "1.005", "1.2345", "99999999999.99", "100000000000", "1e2", "NaN", "Infinity", "+1",
            ".5", "5.", 0, 1, -1, 2, 10**11, 1.5, float("nan"), True, False, [], {}, [1], {"a": 1},
            "sale", "return", "receipt", "footfall", "done", "skipped", "pass", "cash", "discount", "coupon",
            "2026-11-22T01:00:00Z", "2026-11-22T01:00:00", "1999-01-01T00:00:00+00:00", "2026-11-22T09:00:00+08:00",
            "x" * 64, "x" * 65, "x" * 201,
        ]
    ).map(copy.deepcopy),  # a fresh object each time: a drawn dict may be mutated later
    st.text(max_size=8),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.decimals(allow_nan=False, places=3, min_value=-1000, max_value=1000).map(str),
)  # fmt: skip
BASES = [
    f.receipt(1, at=AT, lines=2),
    f.receipt(2, at=AT, lines=2, kind="return"),
    till_receipt(),
    discounted_return(),
    f.footfall(1),
    f.step(1),
    f.step(2, step="symptoms", data={"keywords": ["cough"]}),
]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(BASES), data=st.data())
def test_mutations_give_the_same_outcome_on_both_paths(base: dict[str, Any], data: st.DataObject) -> None:
    payload = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        candidates = paths(payload)
        action = data.draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "add" or not candidates:
            holders = [()] + [p for p in candidates if isinstance(_at(payload, p), dict)]
            holder = data.draw(st.sampled_from(holders))
            key = data.draw(st.sampled_from(["extra", "data", "count_in", "discount", "tax", "rounding", "\ud800",
                                             "line_no", "reason", "id", "source", "tenders", "discounts"]))  # fmt: skip
            _at(payload, holder)[key] = data.draw(ODD_VALUES)
        elif action == "delete":
            path = data.draw(st.sampled_from(candidates))
            payload = without(payload, path)
        else:
            path = data.draw(st.sampled_from(candidates))
            payload = with_value(payload, path, data.draw(ODD_VALUES))
    for prices_include_tax in (None, False):
        assert_same(payload, prices_include_tax=prices_include_tax)


def _at(payload: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        payload = payload[part]
    return payload
