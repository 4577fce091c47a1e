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
