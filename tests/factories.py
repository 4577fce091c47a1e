"""Builders of contract events for tests and benchmarks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

BASE_TIME = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def receipt(
    n: int,
    *,
    store_id: str = "S001",
    terminal_id: str = "T1",
    lines: int = 4,
    at: datetime | None = None,
    kind: str = "sale",
    **extra: Any,
) -> dict[str, Any]:
    at = at or BASE_TIME + timedelta(seconds=n)
    sign = -1 if kind == "return" else 1
    body: list[dict[str, Any]] = []
    for line_no in range(1, lines + 1):
        qty = sign * (1 + line_no % 3)
        price = Decimal("12.50") + line_no
        body.append(
            {
                "line_no": line_no,
                "sku": f"69012345{line_no:05d}",
                "qty": qty,
                "unit_price": str(price),
                "amount": str(price * qty),
                "promotion_id": None,
            }
        )
    total = sum((Decimal(line["amount"]) for line in body), Decimal(0))
    return {
        "type": "receipt",
        "event_id": f"{store_id}-{terminal_id}-{n}",
        "store_id": store_id,
        "terminal_id": terminal_id,
        "receipt_id": f"R{n}",
        "occurred_at": at.isoformat(),
        "kind": kind,
        "staff_id": "E0101",
        "member_id": None,
        "consultation_id": None,
        "lines": body,
        "total": str(total),
        **extra,
    }


def step(n: int, *, step: str = "insurance_check", status: str = "done", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] | None = {"result": "fail", "reason": "card expired"} if step == "insurance_check" else None
    return {
        "type": "consultation_step",
        "event_id": f"step-{n}",
        "store_id": "S001",
        "terminal_id": "T1",
        "consultation_id": f"C-{n}",
        "occurred_at": (BASE_TIME + timedelta(seconds=n)).isoformat(),
        "staff_id": "E0101",
        "customer": {"member_id": "M88812", "name": "王建国"},
        "step": step,
        "status": status,
        "skip_reason": None if status == "done" else "customer refused",
        "data": data,
        **extra,
    }


def footfall(n: int, *, store_id: str = "S001", count_in: int = 37, count_out: int = 31) -> dict[str, Any]:
    return {
        "type": "footfall",
        "event_id": f"ff-{store_id}-{n}",
        "store_id": store_id,
        "sensor_id": "door-1",
        "occurred_at": (BASE_TIME + timedelta(minutes=15 * n)).isoformat(),
        "period_seconds": 900,
        "in": count_in,
        "out": count_out,
    }


def prompt_answer(n: int) -> dict[str, Any]:
    return {
        "type": "prompt_answer",
        "event_id": f"pa-{n}",
        "store_id": "S001",
        "terminal_id": "T1",
        "receipt_id": f"R{n}",
        "sku": "6901234567890",
        "prompt_id": "recommendation_source",
        "answer": "doctor",
        "occurred_at": (BASE_TIME + timedelta(seconds=n)).isoformat(),
        "staff_id": "E0101",
    }


def stock(n: int) -> dict[str, Any]:
    return {
        "type": "stock",
        "event_id": f"stock-{n}",
        "store_id": "S001",
        "occurred_at": (BASE_TIME + timedelta(hours=n)).isoformat(),
        "sku": "6901234567890",
        "on_hand": 14,
        "lots": [
            {"lot": "B2409", "qty": 6, "expires_on": "2027-01-31"},
            {"lot": "B2410", "qty": 8, "expires_on": "2027-03-31"},
        ],
    }


def _receipt_head(receipt_id: str, at: datetime, kind: str) -> dict[str, Any]:
    return {
        "type": "receipt",
        "event_id": f"S001-{receipt_id}",
        "store_id": "S001",
        "terminal_id": "T1",
        "receipt_id": receipt_id,
        "occurred_at": at.isoformat(),
        "kind": kind,
    }


def till_receipt(receipt_id: str = "B1", at: datetime = BASE_TIME, **fields: Any) -> dict[str, Any]:
    """A sale priced without tax, as the spec's example: two discounted lines, a member discount and a
    points reward, 6 % tax on top, paid cash with change and rounded down to the 10 fen."""
    return {
        **_receipt_head(receipt_id, at, "sale"),
        "staff_id": "E0101",
        "lines": [
            {"line_no": 1, "sku": "6901234567890", "qty": "2", "unit_price": "10.00", "amount": "20.00",
             "discount": "2.00"},
            {"line_no": 2, "sku": "6909876543210", "qty": "1", "unit_price": "5.50", "amount": "5.50",
             "discount": "0.50"},
        ],
        "discounts": [
            {"kind": "discount", "amount": "1.00", "reason": "member day", "id": "D7"},
            {"kind": "reward", "amount": "0.50", "reason": "points"},
        ],
        "tax": "1.29",
        "prices_include_tax": False,
        "tenders": [{"type": "cash", "amount": "50.00"}, {"type": "cash", "amount": "-27.30"}],
        "rounding": "-0.09",
        "source": {"name": "poslog:ncr_acs", "store": "9", "workstation": "3", "sequence": "1234"},
        # net 25.50 - 2.50 - 1.50 = 21.50; + tax 1.29 (prices exclude it) - rounding 0.09
        "total": "22.70",
        **fields,
    }  # fmt: skip


def discounted_return(receipt_id: str = "R9", at: datetime = BASE_TIME) -> dict[str, Any]:
    """A return of a discounted line and its share of a receipt discount: every figure negative."""
    return {
        **_receipt_head(receipt_id, at, "return"),
        "lines": [
            {"line_no": 1, "sku": "6901234567890", "qty": "-1", "unit_price": "20.00", "amount": "-20.00",
             "discount": "-2.00"}
        ],
        "discounts": [{"kind": "coupon", "amount": "-1.00"}],
        "tax": "-0.96",
        "tenders": [{"type": "refund", "amount": "-17.00"}],
        "total": "-17.00",
    }  # fmt: skip
