"""The writer contract and the flattening of contract events into table rows."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ingest.contract import (
    ConsultationStepEvent,
    Event,
    FootfallEvent,
    PromptAnswerEvent,
    ReceiptEvent,
    StockEvent,
)
from ingest.errors import BatchRefused, classify

WriteStatus = Literal["accepted", "duplicate"]
ZERO = Decimal(0)


# Column order of every row tuple below; the writers address tables only through these.
COLUMNS: dict[str, tuple[str, ...]] = {
    "receipts": (
        "event_id", "occurred_at", "store_id", "terminal_id", "receipt_id", "kind", "staff_id",
        "member_id", "consultation_id", "total", "line_count", "received_at", "raw",
        "net_total", "discount_total", "tax_total", "prices_include_tax", "tenders", "source_name",
    ),
    "receipt_lines": (
        "event_id", "line_no", "occurred_at", "store_id", "receipt_id", "kind", "sku", "qty",
        "unit_price", "amount", "promotion_id", "discount",
    ),
    "consultation_steps": (
        "event_id", "occurred_at", "store_id", "terminal_id", "consultation_id", "staff_id",
        "member_id", "customer_name", "step", "status", "skip_reason", "data", "received_at", "raw",
    ),
    "prompt_answers": (
        "event_id", "occurred_at", "store_id", "terminal_id", "receipt_id", "sku", "prompt_id",
        "answer", "staff_id", "received_at", "raw",
    ),
    "footfall": (
        "event_id", "occurred_at", "store_id", "sensor_id", "period_seconds", "count_in",
        "count_out", "received_at", "raw",
    ),
    "stock_snapshots": ("event_id", "occurred_at", "store_id", "sku", "on_hand", "received_at", "raw"),
    "stock_lots": ("event_id", "lot", "occurred_at", "store_id", "sku", "qty", "expires_on"),
}  # fmt: skip

HEADER_TABLE: dict[str, str] = {
    "receipt": "receipts",
    "consultation_step": "consultation_steps",
    "prompt_answer": "prompt_answers",
    "footfall": "footfall",
    "stock": "stock_snapshots",
}
PARENT_TABLE: dict[str, str] = {"receipt_lines": "receipts", "stock_lots": "stock_snapshots"}


def children_of_accepted(rows: RowSet, table: str, accepted: dict[str, set[int]]) -> list[tuple[Any, ...]]:
    """Child rows (lines, lots) whose parent event was newly inserted.

    A parent row and its children are written in one transaction, so children of a new parent
    cannot exist yet and go in without any conflict check; children of a duplicate are dropped.
    Child rows start with (event_id, part, occurred_at).
    """
    parent = PARENT_TABLE[table]
    parent_rows = rows.headers.get(parent, [])
    new_parents = {(parent_rows[i][0], parent_rows[i][1]) for i in accepted.get(parent, ())}
    return [row for row in rows.children.get(table, []) if (row[0], row[2]) in new_parents]


@dataclass
class RowSet:
    """Rows of one batch, grouped by table; ``owners`` maps header rows back to batch positions."""

    headers: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    owners: dict[str, list[int]] = field(default_factory=dict)
    children: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)


def flatten(events: Sequence[Event], raws: Sequence[dict[str, Any]], received_at: datetime) -> RowSet:
    rows = RowSet()
    for position, (event, raw) in enumerate(zip(events, raws, strict=True)):
        table = HEADER_TABLE[event.type]
        at = event.occurred_at
        if isinstance(event, ReceiptEvent):
            lines = rows.children.setdefault("receipt_lines", [])
            # ReceiptEvent.net_sales and discount_total, summed in the one pass over the lines
            # this loop makes anyway: the COPY writer's throughput shows every extra pass.
            amounts = discounts = ZERO
            for line in event.lines:
                amounts += line.amount
                discounts += line.discount
                lines.append(
                    (
                        event.event_id,
                        line.line_no,
                        at,
                        event.store_id,
                        event.receipt_id,
                        event.kind,
                        line.sku,
                        line.qty,
                        line.unit_price,
                        line.amount,
                        line.promotion_id,
                        line.discount,
                    )
                )
            for discount in event.discounts:
                discounts += discount.amount
            header: tuple[Any, ...] = (
                event.event_id,
                at,
                event.store_id,
                event.terminal_id,
                event.receipt_id,
                event.kind,
                event.staff_id,
                event.member_id,
                event.consultation_id,
                event.total,
                len(event.lines),
                received_at,
                raw,
                amounts - discounts,
                discounts,
                event.tax,
                event.prices_include_tax,
                tenders_doc(event),
                event.source.name if event.source else None,
            )
        elif isinstance(event, ConsultationStepEvent):
            customer = event.customer
            header = (
                event.event_id,
                at,
                event.store_id,
                event.terminal_id,
                event.consultation_id,
                event.staff_id,
                customer.member_id if customer else None,
                customer.name if customer else None,
                event.step,
                event.status,
                event.skip_reason,
                event.data,
                received_at,
                raw,
            )
        elif isinstance(event, PromptAnswerEvent):
            header = (
                event.event_id,
                at,
                event.store_id,
                event.terminal_id,
                event.receipt_id,
                event.sku,
                event.prompt_id,
                event.answer,
                event.staff_id,
                received_at,
                raw,
            )
        elif isinstance(event, FootfallEvent):
            header = (
                event.event_id,
                at,
                event.store_id,
                event.sensor_id,
                event.period_seconds,
                event.count_in,
                event.count_out,
                received_at,
                raw,
            )
        elif isinstance(event, StockEvent):
            header = (event.event_id, at, event.store_id, event.sku, event.on_hand, received_at, raw)
            lots = rows.children.setdefault("stock_lots", [])
            for lot in event.lots:
                lots.append((event.event_id, lot.lot, at, event.store_id, event.sku, lot.qty, lot.expires_on))
        else:  # pragma: no cover - the contract union is closed
            raise TypeError(f"no table for {type(event).__name__}")
        rows.headers.setdefault(table, []).append(header)
        rows.owners.setdefault(table, []).append(position)
    return rows


def tenders_doc(event: ReceiptEvent) -> list[dict[str, str]] | None:
    """Tenders as stored: amounts as exact decimal strings, the same JSON on every backend."""
    if event.tenders is None:
        return None
    return [{"type": tender.type, "amount": str(tender.amount)} for tender in event.tenders]


def event_key(event: Event) -> tuple[str, str, datetime]:
    return HEADER_TABLE[event.type], event.event_id, event.occurred_at.astimezone(UTC)


class EventWriter(ABC):
    """Stores a batch of validated events idempotently inside the caller's transaction."""

    dialect: ClassVar[str]

    def write(
        self,
        events: Sequence[Event],
        raws: Sequence[dict[str, Any]],
        *,
        session: Session,
        received_at: datetime | None = None,
    ) -> list[WriteStatus]:
        """Return one status per event, in order. Repeats inside the batch are duplicates."""
        statuses: list[WriteStatus] = ["duplicate"] * len(events)
        first_seen: dict[tuple[str, str, datetime], int] = {}
        for position, event in enumerate(events):
            first_seen.setdefault(event_key(event), position)
        unique_positions = sorted(first_seen.values())
        unique_events = [events[p] for p in unique_positions]
        unique_raws = [raws[p] for p in unique_positions]
        rows = flatten(unique_events, unique_raws, received_at or datetime.now(UTC))
        try:
            accepted = self._store(rows, session=session)
        except DBAPIError as exc:
            # Only a refused value makes the batch go event by event into the dead letters; a
            # missing table, column or privilege, a timeout or a full disk propagates as it is.
            diagnosis = classify(exc)
            if not diagnosis.is_data:
                raise
            raise BatchRefused(diagnosis.reason) from exc
        except UnicodeEncodeError as exc:
            raise BatchRefused(f"text that is not valid Unicode ({exc.reason})") from exc
        except OverflowError as exc:
            raise BatchRefused(f"a number too large for the database ({exc})") from exc
        for table, owners in rows.owners.items():
            for local_index in accepted.get(table, ()):
                statuses[unique_positions[owners[local_index]]] = "accepted"
        return statuses

    @abstractmethod
    def _store(self, rows: RowSet, *, session: Session) -> dict[str, set[int]]:
        """Insert the rows, skipping existing keys; return the inserted header indexes per table."""


def raw_json(raw: dict[str, Any]) -> str:
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":"), default=str)


_REGISTRY: dict[str, type[EventWriter]] = {}


def register_writer(dialect: str, writer: type[EventWriter]) -> None:
    _REGISTRY[dialect] = writer


def get_writer(dialect: str) -> EventWriter:
    try:
        return _REGISTRY[dialect]()
    except KeyError:
        raise LookupError(f"no event writer for database dialect {dialect!r}") from None
