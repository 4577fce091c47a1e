"""UCI Online Retail (one CSV per day) as contract v1 `receipt` events for the demo chain.

The files (``InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country``)
are the sales of a UK online retailer. The mapping onto StorePulse:

- **receipt**: one per invoice. ``event_id`` is ``uci-or-<InvoiceNo>`` (so a replay of the same
  file is a redelivery, never a new sale), ``receipt_id`` is the invoice number, ``terminal_id``
  is ``T1``. Invoices starting with ``C`` are cancellations and become ``kind: return``.
- **store**: the data has a single shop, so invoices are spread over the demo stores
  deterministically by invoice number: ``stores[number % len(stores)]``, where ``number`` is the
  invoice number without the ``C`` (with S001–S003: 536365 → S002, 536366 → S003, ...).
- **time**: ``InvoiceDate`` is naive; it is the shop's wall-clock time and is read in
  ``Europe/London`` (GMT, ``+00:00``, in December) and sent as RFC 3339 with that offset. An
  invoice whose rows carry different minutes (one does) takes the time of its first row.
- **lines**: one per CSV row, ``line_no`` 1, 2, ... in file order; ``sku`` = StockCode,
  ``qty`` = Quantity, ``unit_price`` = UnitPrice, ``amount`` = qty × unit price (exact: whole
  quantities and prices with at most 2 decimals), ``total`` = the sum of the amounts. The
  description is kept as an extra line field, the country as an extra receipt field, the
  customer as ``member_id`` (without the ``.0`` of the export; none when empty).

What the contract cannot carry is not guessed at; it is left out and reported in
`Conversion.skipped` with the file, line and reason:

- rows, skipped alone: a negative quantity on an invoice that is not a cancellation. These
  are stock adjustments ("damages", "check", "?", unit price 0), not sales: 70 rows in December
  2010, each the only row of its invoice. Also a cancellation row without a negative quantity
  (none in the data), which is no valid return line.
- invoices, skipped whole (a receipt with a line missing would state a wrong total): a unit price
  with more than 2 decimals or below zero, a quantity that is not a whole number, an unreadable
  date, more lines than a receipt may have. None of these occur in December 2010.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

SOURCE_ZONE = ZoneInfo("Europe/London")
DEMO_STORES: tuple[str, ...] = ("S001", "S002", "S003")
TERMINAL_ID = "T1"
EVENT_ID_PREFIX = "uci-or-"
MAX_LINES = 1000  # the contract's limit per receipt
COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class Skipped:
    """A CSV row (or a whole invoice, then the line of its first row) left out, and why."""

    file: str
    line: int
    invoice: str
    reason: str
    rows: int = 1


@dataclass
class Conversion:
    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def skipped_rows(self) -> int:
        return sum(s.rows for s in self.skipped)


@dataclass
class _Row:
    file: str
    line: int
    values: dict[str, str]


class _InvoiceError(ValueError):
    pass


def day_files(folder: Path) -> list[Path]:
    """The day files of a folder, in date order (their names are ``YYYY-MM-DD.csv``)."""
    return sorted(folder.glob("*.csv"))


def store_for(invoice: str, stores: Sequence[str] = DEMO_STORES) -> str:
    return stores[int(invoice.removeprefix("C")) % len(stores)]


def event_topic(event: dict[str, Any], prefix: str = "storepulse/v1") -> str:
    return f"{prefix}/{event['store_id']}/pos/{event['terminal_id']}/events"


def _read(paths: Iterable[Path]) -> dict[str, list[_Row]]:
    """Rows grouped by invoice, invoices in order of first appearance, rows in file order."""
    invoices: dict[str, list[_Row]] = {}
    for path in paths:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not an Online Retail file, missing columns {sorted(missing)}")
            for values in reader:
                invoice = (values["InvoiceNo"] or "").strip()
                invoices.setdefault(invoice, []).append(_Row(path.name, reader.line_num, values))
    return invoices


def _quantity(text: str) -> int:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise _InvoiceError(f"Quantity {text!r} is not a number") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise _InvoiceError(f"Quantity {text!r} is not a whole number")
    return int(number)


def _price(text: str) -> Decimal:
    try:
        price = Decimal(text.strip())
    except InvalidOperation:
        raise _InvoiceError(f"UnitPrice {text!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise _InvoiceError(f"UnitPrice {text!r} is not a price")
    if price != price.quantize(_CENT):
        raise _InvoiceError(f"UnitPrice {text!r} has more than 2 decimals (the contract carries cents)")
    return price.quantize(_CENT)


def _time(text: str, zone: ZoneInfo) -> str:
    try:
        naive = datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        try:
            naive = datetime.strptime(text.strip(), "%Y-%m-%d %H:%M")
        except ValueError:
            raise _InvoiceError(f"InvoiceDate {text!r} is not a date and time") from None
    return naive.replace(tzinfo=zone).isoformat()


def _member(text: str | None) -> str | None:
    value = (text or "").strip()
    if not value:
        return None
    return value.removesuffix(".0")


def _invoice_event(
    invoice: str, rows: list[_Row], stores: Sequence[str], zone: ZoneInfo, terminal_id: str, skipped: list[Skipped]
) -> dict[str, Any] | None:
    if not invoice.removeprefix("C").isdigit():
        raise _InvoiceError(f"InvoiceNo {invoice!r} is not an invoice number")
    is_return = invoice.startswith("C")
    lines: list[dict[str, Any]] = []
    for row in rows:
        qty = _quantity(row.values["Quantity"] or "")
        price = _price(row.values["UnitPrice"] or "")
        if not is_return and qty < 0:
            skipped.append(
                Skipped(row.file, row.line, invoice, "negative quantity on a sale invoice: stock adjustment")
            )
            continue
        if is_return and qty >= 0:
            skipped.append(Skipped(row.file, row.line, invoice, "cancellation row without a negative quantity"))
            continue
        line: dict[str, Any] = {
            "line_no": len(lines) + 1,
            "sku": (row.values["StockCode"] or "").strip(),
            "qty": qty,
            "unit_price": str(price),
            "amount": str((qty * price).quantize(_CENT)),
        }
        description = (row.values["Description"] or "").strip()
        if description:
            line["description"] = description
        lines.append(line)
    if not lines:
        return None
    if len(lines) > MAX_LINES:
        raise _InvoiceError(f"{len(lines)} lines, more than the {MAX_LINES} a receipt may have")
    first = rows[0].values
    total = sum((Decimal(line["amount"]) for line in lines), Decimal("0.00"))
    event: dict[str, Any] = {
        "type": "receipt",
        "event_id": f"{EVENT_ID_PREFIX}{invoice}",
        "store_id": store_for(invoice, stores),
        "terminal_id": terminal_id,
        "receipt_id": invoice,
        "occurred_at": _time(first["InvoiceDate"] or "", zone),
        "kind": "return" if is_return else "sale",
        "member_id": _member(first["CustomerID"]),
        "lines": lines,
        "total": str(total),
        "source": "uci-online-retail",
    }
    country = (first["Country"] or "").strip()
    if country:
        event["country"] = country
    return event


def convert(
    paths: Iterable[Path],
    *,
    stores: Sequence[str] = DEMO_STORES,
    zone: ZoneInfo = SOURCE_ZONE,
    terminal_id: str = TERMINAL_ID,
) -> Conversion:
    """Read the files and build one receipt event per invoice (see the module docstring)."""
    if not stores:
        raise ValueError("stores: at least one store is needed")
    result = Conversion()
    for invoice, rows in _read(paths).items():
        row_skips: list[Skipped] = []
        try:
            event = _invoice_event(invoice, rows, stores, zone, terminal_id, row_skips)
        except _InvoiceError as exc:
            result.skipped.append(Skipped(rows[0].file, rows[0].line, invoice, f"invoice skipped: {exc}", len(rows)))
            continue
        result.skipped.extend(row_skips)
        if event is not None:
            result.events.append(event)
    return result
