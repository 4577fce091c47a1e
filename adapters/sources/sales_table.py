"""Spreadsheet and CSV sales exports as contract v1 `receipt` events, driven by a mapping profile.

Chinese pharmacy back offices (海典, 英克, 思迅, 科脉, a hospital pharmacy's own system) export sales
as one row per sale line. A profile (seeds/import_profiles/*.yaml, see `sales_profiles` and
docs/sales-import.md) says which column holds which receipt field. The adapter then:

- groups rows into receipts by the receipt column, or by a configured key (store + date + card)
  where the export has none; a receipt never spans two stores or two days;
- splits a group's negative-quantity rows into a return receipt of their own (the contract's
  return lines carry a negative qty and amount);
- stamps date-only rows at the profile's time of day and marks the event ``"time_assumed": true``;
- books 应收 (list amount) − 实收 (paid) as the line's `discount`, so net sales are what was paid;
- maps stores, SKUs and staff through the `AdapterContext` (unmapped ids pass through as they are);
- refuses a row with an empty required cell or a value it cannot read, reports it with its row
  number as a person sees it in the spreadsheet (header = row 1), and imports the rest; with
  ``strict=True`` any refused row refuses the whole file (`SalesFileRefused`);
- reports product codes with several names, with the rows of each name.

Event ids come from the natural key, ``natural_id("sales", profile, store, date, group key...,
kind)``, so importing the same file again yields only duplicates.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar

from adapters.sources.base import (
    MAX_ID,
    MAX_LINES,
    AdapterContext,
    Conversion,
    ImportReport,
    SourceAdapter,
    cents,
    natural_id,
    register_adapter,
)
from adapters.sources.sales_profiles import PROFILES_DIR, ProfileError, SalesProfile, load_profile

ENCODINGS = ("auto", "utf-8", "utf-8-sig", "gb18030", "gbk")
_XLSX_MAGIC = b"PK\x03\x04"
_DATE = re.compile(
    r"^(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?"
    r"(?:[ T]+(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?\s*(.*)$"
)
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?$")
_WEEKDAYS_ZH = "一二三四五六日"
_WEEKDAY_LABEL = re.compile(r"^(?:星期|周|礼拜)([一二三四五六日天])$|^[A-Za-z]{3,9}\.?$")


class SalesImportError(ValueError):
    """A file the profile cannot read at all (wrong kind, encoding, missing column)."""


class SalesFileRefused(ValueError):
    """Strict mode: some rows were refused, so the whole file is; `report` says which and why."""

    def __init__(self, message: str, report: SalesImportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class RefusedRow:
    row: int
    reason: str
    list_amount: Decimal | None = None
    paid_amount: Decimal | None = None


@dataclass
class SalesImportReport(ImportReport):
    """The base report plus every refused row and every product code with several names."""

    refused_rows: list[RefusedRow] = field(default_factory=list)
    # code → name → spreadsheet rows, for codes that appear under more than one name
    shared_codes: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        result = super().as_dict()
        result["refused_rows"] = [
            {
                "row": refused.row,
                "reason": refused.reason,
                "list_amount": None if refused.list_amount is None else str(refused.list_amount),
                "paid_amount": None if refused.paid_amount is None else str(refused.paid_amount),
            }
            for refused in self.refused_rows
        ]
        result["shared_codes"] = self.shared_codes
        return result


class _RowError(ValueError):
    pass


@dataclass
class _Line:
    row: int
    store_id: str
    store_ext: str
    day: date
    clock: time | None
    receipt: str | None
    terminal: str | None
    sku: str
    name: str | None
    qty: Decimal
    unit_price: Decimal
    amount: Decimal
    discount: Decimal
    paid: Decimal
    list_amount: Decimal
    member: str | None
    staff: str | None


# --- reading the file -----------------------------------------------------------------------


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _detect_encoding(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "gb18030"
    return "utf-8"


def _decode(data: bytes, encoding: str, where: str) -> tuple[str, str]:
    chosen = _detect_encoding(data) if encoding == "auto" else encoding
    try:
        return data.decode(chosen), chosen
    except UnicodeDecodeError as exc:
        how = "detected" if encoding == "auto" else "set by the profile's file.encoding"
        raise SalesImportError(
            f"{where}: byte {exc.start} is not {chosen} ({how}); save the file as UTF-8 or GB18030, "
            "or set file.encoding"
        ) from None


def _csv_rows(path: Path, profile: SalesProfile, encoding: str) -> tuple[list[Sequence[object]], str]:
    data = path.read_bytes()
    if data.startswith(_XLSX_MAGIC):
        raise SalesImportError(f"{path.name}: an XLSX workbook, but profile {profile.name!r} reads CSV (file.kind)")
    text, chosen = _decode(data, encoding, path.name)
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=profile.file.delimiter)), chosen


def _xlsx_rows(path: Path, profile: SalesProfile) -> tuple[list[Sequence[object]], str]:
    import openpyxl  # only the XLSX path pays for it

    with path.open("rb") as handle:
        if handle.read(4) != _XLSX_MAGIC:
            raise SalesImportError(f"{path.name}: not an XLSX workbook, but profile {profile.name!r} reads XLSX")
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        wanted = profile.file.sheet
        if wanted is None:
            sheet = workbook.worksheets[0]
        elif wanted in workbook.sheetnames:
            sheet = workbook[wanted]
        else:
            raise SalesImportError(
                f"{path.name}: no sheet {wanted!r} (profile file.sheet); "
                f"the sheets are {', '.join(workbook.sheetnames)}"
            )
        return [tuple(row) for row in sheet.iter_rows(values_only=True)], sheet.title
    finally:
        workbook.close()


def _text(value: object) -> str:
    """A cell as text: Excel keeps long codes as numbers (6901234567890.0), never as 6.90123e12."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value).strip()


# --- reading one row ------------------------------------------------------------------------


def _number(value: object, label: str) -> Decimal:
    if isinstance(value, bool):
        raise _RowError(f"{label} {value!r} is not a number")
    if isinstance(value, float):
        number = Decimal(repr(value))  # the shortest repr is what Excel shows: 24.64, not 24.6399...
    elif isinstance(value, int | Decimal):
        number = Decimal(value)
    else:
        text = str(value).strip().replace(",", "").replace("¥", "").replace("￥", "")
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise _RowError(f"{label} {str(value).strip()!r} is not a number") from None
    if not number.is_finite():
        raise _RowError(f"{label} {value!r} is not a number")
    if abs(number) >= Decimal(10) ** 11:
        raise _RowError(f"{label} {value!r} is out of range")
    return number


def _quantity(value: object, label: str) -> Decimal:
    qty = _number(value, label)
    exponent = qty.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -3 and qty != qty.quantize(Decimal("0.001")):
        raise _RowError(f"{label} {value!r} has more than 3 decimals")
    return qty.normalize() if qty == qty.to_integral_value() else qty


def _day_and_clock(value: object, label: str, date_format: str | None) -> tuple[date, time | None, bool]:
    """The date, the time when the cell has one, and whether a weekday label disagreed."""
    if isinstance(value, datetime):
        # An Excel date cell is a datetime at midnight: a date without a time.
        return value.date(), (value.time() if value.time() != time(0) else None), False
    if isinstance(value, date):
        return value, None, False
    text = _text(value)
    if date_format:
        stripped = re.sub(r"\s*(?:星期|周|礼拜)[一二三四五六日天]\s*$", "", text)
        try:
            parsed = datetime.strptime(stripped, date_format)
        except ValueError:
            raise _RowError(f"{label} {text!r} does not match date_format {date_format!r}") from None
        return parsed.date(), (parsed.time() if parsed.time() != time(0) else None), False
    match = _DATE.match(text)
    if not match:
        raise _RowError(f"{label} {text!r} is not a date (expected e.g. 2018-01-01)")
    year, month, day_of_month, hour, minute, second, rest = match.groups()
    try:
        day = date(int(year), int(month), int(day_of_month))
        clock = time(int(hour), int(minute), int(second or 0)) if hour is not None else None
    except ValueError:
        raise _RowError(f"{label} {text!r} is not a valid date") from None
    rest = rest.strip()
    label_match = _WEEKDAY_LABEL.match(rest) if rest else None
    if rest and not label_match:
        raise _RowError(f"{label} {text!r} is not a date (unexpected {rest!r} after it)")
    wrong_weekday = False
    if label_match and label_match.group(1):
        named = _WEEKDAYS_ZH.index("日" if label_match.group(1) == "天" else label_match.group(1))
        wrong_weekday = named != day.weekday()
    return day, clock, wrong_weekday


def _clock(value: object, label: str) -> time | None:
    if _is_empty(value):
        return None
    if isinstance(value, datetime):
        return value.time()
    if isinstance(value, time):
        return value
    if isinstance(value, float) and 0 <= value < 1:  # an Excel time stored as a fraction of a day
        seconds = round(value * 86400)
        return time(seconds // 3600, seconds // 60 % 60, seconds % 60) if seconds < 86400 else time(23, 59, 59)
    match = _TIME.match(_text(value))
    if not match:
        raise _RowError(f"{label} {_text(value)!r} is not a time of day (expected e.g. 10:15 or 10:15:32)")
    hour, minute, second = match.groups()
    try:
        return time(int(hour), int(minute), int(second or 0))
    except ValueError:
        raise _RowError(f"{label} {_text(value)!r} is not a valid time of day") from None


def _identifier(value: object, label: str) -> str:
    text = _text(value)
    if len(text) > MAX_ID or "\x00" in text:
        raise _RowError(f"{label} {text[:20]!r}... is longer than the {MAX_ID} characters an id may have")
    return text


# --- the adapter ----------------------------------------------------------------------------


@register_adapter
class SalesTableAdapter(SourceAdapter):
    """`get_adapter("sales", profile="chaoyang_pharmacy", strict=False, store=None, encoding=None)`.

    ``profile``: a shipped profile name, a path to a profile file, or a loaded `SalesProfile`.
    ``store``: a StorePulse store id for every row (overrides the profile's store and mappings).
    ``encoding``: overrides the profile's file.encoding for CSV files.
    ``strict``: a refused row refuses the whole file (`SalesFileRefused`, with the report).
    """

    name: ClassVar[str] = "sales"

    def __init__(
        self,
        *,
        profile: str | Path | SalesProfile | None = None,
        strict: bool = False,
        store: str | None = None,
        encoding: str | None = None,
        profiles_dir: Path = PROFILES_DIR,
    ) -> None:
        if profile is None:
            raise ProfileError("profile: the sales adapter needs a profile (e.g. profile='chaoyang_pharmacy')")
        self.profile = profile if isinstance(profile, SalesProfile) else load_profile(profile, profiles_dir)
        if encoding is not None and encoding not in ENCODINGS:
            raise ProfileError(f"encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
        if store is not None and not (0 < len(store.strip()) <= MAX_ID):
            raise ProfileError(f"store: {store!r} is not a store id")
        self.strict = strict
        self.store = store.strip() if store else None
        self.encoding = encoding or self.profile.file.encoding

    @property
    def source_name(self) -> str:
        """The source name of the events and of the store/SKU/staff mappings they look up."""
        return self.profile.source

    def convert(self, path: Path, *, context: AdapterContext) -> Conversion:
        return _Conversion(self, Path(path), context).run()


class _Conversion:
    """One file through one profile: rows → lines → receipts, and the report of it all."""

    def __init__(self, adapter: SalesTableAdapter, path: Path, context: AdapterContext) -> None:
        self.profile = adapter.profile
        self.adapter = adapter
        self.path = path
        self.context = context
        self.report = SalesImportReport(source=self.profile.source, file=path.name)
        self.columns = self.profile.columns.mapped()
        self.required = set(self.profile.required_fields())
        self.where = path.name
        self.unmapped_stores: set[str] = set()
        self.paid_above_list: list[int] = []
        self.wrong_weekdays: list[int] = []
        self.rounded_unit_prices = 0

    # -- reading

    def _table(self) -> list[Sequence[object]]:
        if self.profile.file.kind == "xlsx":
            rows, sheet = _xlsx_rows(self.path, self.profile)
            self.where = f"{self.path.name}:{sheet}!"
            return rows
        rows, encoding = _csv_rows(self.path, self.profile, self.adapter.encoding)
        self.where = f"{self.path.name}:"
        self.report.findings.append(
            f"encoding: {encoding}" + (" (detected)" if self.adapter.encoding == "auto" else "")
        )
        return rows

    def _positions(self, header: Sequence[object]) -> dict[str, int]:
        names = [_text(cell).lstrip("\ufeff").strip() for cell in header]
        positions: dict[str, int] = {}
        missing = []
        for field_name, column in self.columns.items():
            if column in names:
                positions[field_name] = names.index(column)
            else:
                missing.append(f"{column!r} (columns.{field_name})")
        if missing:
            found = ", ".join(name for name in names if name) or "nothing"
            raise SalesImportError(
                f"{self.path.name}: row {self.profile.file.header_row} has no column {', '.join(missing)} "
                f"of profile {self.profile.name!r}; the header reads: {found}"
            )
        return positions

    def run(self) -> Conversion:
        table = self._table()
        header_row = self.profile.file.header_row
        if len(table) < header_row:
            raise SalesImportError(f"{self.path.name}: no header row {header_row} (the file has {len(table)} rows)")
        positions = self._positions(table[header_row - 1])
        body = table[header_row:]
        while body and all(_is_empty(cell) for cell in body[-1]):
            body.pop()  # spreadsheets keep formatted empty rows at the end; they are no data
        names_by_code: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        lines: list[_Line] = []
        for offset, cells in enumerate(body):
            row = header_row + 1 + offset
            self.report.counts["rows"] += 1
            values = {name: (cells[index] if index < len(cells) else None) for name, index in positions.items()}
            code, product = _text(values.get("sku")), _text(values.get("name"))
            if code and product:
                names_by_code[code][product].append(row)
            line = self._line(row, values)
            if line is not None:
                lines.append(line)
        self._report_codes(names_by_code)
        if self.adapter.strict and self.report.refused_rows:
            refused = self.report.refused_rows
            shown = "; ".join(f"row {r.row}: {r.reason}" for r in refused[:5])
            more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
            self.report.findings.append(f"strict: the file is refused, {len(refused)} rows could not be imported")
            raise SalesFileRefused(
                f"{self.path.name}: refused (strict): {len(refused)} rows could not be imported: {shown}{more}",
                self.report,
            )
        events = self._receipts(lines)
        self._findings()
        return Conversion(events, self.report)

    # -- rows

    def _label(self, field_name: str) -> str:
        return f"{self.columns[field_name]} ({field_name})"

    def _refuse(self, row: int, reason: str, values: dict[str, object]) -> None:
        amounts: dict[str, Decimal | None] = {}
        for name in ("list_amount", "paid_amount"):
            try:
                amounts[name] = None if _is_empty(values.get(name)) else _number(values.get(name), name)
            except _RowError:
                amounts[name] = None
            found = amounts[name]
            if found is not None:
                # Shown in cents like the other totals, unless the cell has more decimals than that.
                self.report.add(f"refused_{name}", cents(found) if cents(found) == found else found)
        self.report.refused_rows.append(RefusedRow(row, reason, amounts["list_amount"], amounts["paid_amount"]))
        self.report.skip(f"{self.where}{row}", reason)
        self.report.counts["rows_refused"] += 1

    def _line(self, row: int, values: dict[str, object]) -> _Line | None:
        if all(_is_empty(value) for value in values.values()):
            self._refuse(row, "empty row", values)
            return None
        empty = [self._label(name) for name in self.columns if name in self.required and _is_empty(values.get(name))]
        if empty:
            self._refuse(row, f"empty required cell: {', '.join(empty)}", values)
            return None
        try:
            return self._parse(row, values)
        except _RowError as exc:
            self._refuse(row, str(exc), values)
            return None

    def _parse(self, row: int, values: dict[str, object]) -> _Line:
        profile = self.profile
        day, clock, wrong_weekday = _day_and_clock(values["date"], self._label("date"), profile.date_format)
        if wrong_weekday:
            self.wrong_weekdays.append(row)
        if "time" in values and not _is_empty(values["time"]):
            clock = _clock(values["time"], self._label("time"))
        qty = _quantity(values["qty"], self._label("qty"))
        sign = Decimal(-1) if qty < 0 else Decimal(1)
        unit_price = self._optional_amount(values, "unit_price")
        list_amount = self._optional_amount(values, "list_amount")
        paid = self._optional_amount(values, "paid_amount")
        for name, amount in (("list_amount", list_amount), ("paid_amount", paid)):
            if amount is not None and amount * sign < 0:
                what = "negative (a return)" if qty < 0 else "not negative (a sale)"
                raise _RowError(
                    f"{self._label(name)} {amount} has the wrong sign: {self._label('qty')} {qty} is {what}"
                )
        if list_amount is None:
            list_amount = paid if unit_price is None else cents(unit_price * qty)
        if paid is None:
            paid = list_amount
        assert list_amount is not None and paid is not None  # the profile maps at least one amount
        if unit_price is None:
            if qty == 0 and list_amount != 0:
                raise _RowError(f"{self._label('qty')} is 0 but the amount is {list_amount}: no unit price")
            unit_price = Decimal("0.00") if qty == 0 else cents(abs(list_amount / qty))
            if qty and unit_price * abs(qty) != abs(list_amount):
                self.rounded_unit_prices += 1
        amount, discount = list_amount, list_amount - paid
        if abs(paid) > abs(list_amount):
            # Paid above list: no negative discount exists in the contract, so the line is stored at
            # what was paid and the row is reported.
            amount, discount = paid, Decimal("0.00")
            self.paid_above_list.append(row)
        store_ext = self._store_external(values)
        store_id = self.adapter.store or self.context.map("store", store_ext)
        if store_id is None:
            store_id = store_ext
            self.unmapped_stores.add(store_ext)
        sku_code = _identifier(values["sku"], self._label("sku"))
        staff = _identifier(values.get("staff"), self._label("staff")) if "staff" in values else ""
        return _Line(
            row=row,
            store_id=store_id,
            store_ext=store_ext,
            day=day,
            clock=clock,
            receipt=_identifier(values["receipt"], self._label("receipt")) if "receipt" in values else None,
            terminal=_identifier(values["terminal"], self._label("terminal")) if "terminal" in values else None,
            sku=self.context.map("sku", sku_code) or sku_code,
            name=_text(values.get("name"))[:200] or None,
            qty=qty,
            unit_price=unit_price,
            amount=amount,
            discount=discount,
            paid=paid,
            list_amount=list_amount,
            member=(_identifier(values["member"], self._label("member")) or None) if "member" in values else None,
            staff=(self.context.map("staff", staff) or staff) if staff else None,
        )

    def _optional_amount(self, values: dict[str, object], name: str) -> Decimal | None:
        if name not in values or _is_empty(values[name]):
            return None
        amount = _number(values[name], self._label(name))
        rounded = cents(amount)
        if rounded != amount:
            self.report.counts[f"{name}_rounded_to_cents"] += 1
        return rounded

    def _store_external(self, values: dict[str, object]) -> str:
        if "store" in values:
            store = _identifier(values["store"], self._label("store"))
            if store:
                return store
            if self.profile.store.fixed is None and self.adapter.store is None:
                raise _RowError(f"{self._label('store')} is empty and the profile has no store.fixed")
        return self.profile.store.fixed or self.adapter.store or ""

    # -- receipts

    def _group_key(self, line: _Line) -> tuple[str, ...]:
        if line.receipt is not None:
            return (line.receipt,)
        by = self.profile.receipts.group_by or []
        key = {"member": line.member, "staff": line.staff, "terminal": line.terminal}
        return tuple(key[name] or "" for name in by if name not in ("store", "date"))

    def _receipts(self, lines: list[_Line]) -> list[dict[str, Any]]:
        groups: dict[tuple[str, date, tuple[str, ...]], list[_Line]] = {}
        for line in lines:
            groups.setdefault((line.store_id, line.day, self._group_key(line)), []).append(line)
        events: list[dict[str, Any]] = []
        for (store_id, day, key), group in groups.items():
            sales = [line for line in group if line.qty >= 0]
            returns = [line for line in group if line.qty < 0]
            for kind, part in (("sale", sales), ("return", returns)):
                if not part:
                    continue
                mixed = kind == "return" and bool(sales)
                chunks = [part[start : start + MAX_LINES] for start in range(0, len(part), MAX_LINES)]
                for number, chunk in enumerate(chunks, 1):
                    events.append(self._event(store_id, day, key, kind, chunk, mixed, number))
        return events

    def _event(
        self,
        store_id: str,
        day: date,
        key: tuple[str, ...],
        kind: str,
        lines: list[_Line],
        mixed: bool,
        part: int,
    ) -> dict[str, Any]:
        profile = self.profile
        first = lines[0]
        suffix = ("-R" if mixed else "") + (f"-{part}" if part > 1 else "")
        # The export's own receipt number where it has one, else the grouping key (date, card, ...).
        base = first.receipt if first.receipt is not None else ":".join([day.isoformat(), *key])
        receipt_id = natural_id(base + suffix)
        clock = next((line.clock for line in lines if line.clock is not None), None)
        assumed = clock is None
        stamp = datetime.combine(day, clock or profile.receipts.time_of_day, tzinfo=self.context.zone(store_id))
        payload_lines: list[dict[str, Any]] = []
        for line_no, line in enumerate(lines, 1):
            item: dict[str, Any] = {
                "line_no": line_no,
                "sku": line.sku,
                "qty": format(line.qty, "f"),
                "unit_price": str(line.unit_price),
                "amount": str(line.amount),
            }
            if line.discount:
                item["discount"] = str(line.discount)
            if line.name:
                item["description"] = line.name
            item["row"] = line.row
            payload_lines.append(item)
        net = sum((line.amount - line.discount for line in lines), Decimal("0.00"))
        source: dict[str, str] = {"name": profile.source, "business_day": day.isoformat()}
        if first.store_ext:
            source["store"] = first.store_ext
        if first.receipt is not None:
            source["sequence"] = first.receipt
        if first.terminal:
            source["workstation"] = first.terminal
        parts = [f"p{part}"] if part > 1 else []
        member = next((line.member for line in lines if line.member), None)
        staff = next((line.staff for line in lines if line.staff), None)
        event: dict[str, Any] = {
            "type": "receipt",
            "event_id": natural_id("sales", profile.name, store_id, day.isoformat(), *key, kind, *parts),
            "store_id": store_id,
            "terminal_id": first.terminal or profile.terminal,
            "receipt_id": receipt_id,
            "occurred_at": stamp.isoformat(),
            "kind": kind,
            "lines": payload_lines,
            "total": str(net),
            "source": source,
        }
        if member:
            event["member_id"] = member
        if staff:
            event["staff_id"] = staff
        if assumed:
            event["time_assumed"] = True
        self._count_receipt(kind, lines, assumed)
        return event

    def _count_receipt(self, kind: str, lines: list[_Line], assumed: bool) -> None:
        report = self.report
        report.counts["receipts"] += 1
        report.counts[f"{kind}_receipts"] += 1
        report.counts["lines"] += len(lines)
        report.counts["rows_imported"] += len(lines)
        if kind == "return":
            report.counts["return_lines"] += len(lines)
        if assumed:
            report.counts["receipts_time_assumed"] += 1
        for line in lines:
            report.add("imported_list_amount", line.list_amount)
            report.add("imported_paid_amount", line.paid)
            report.add("line_amount", line.amount)
            report.add("line_discount", line.discount)
            report.add("net_sales", line.amount - line.discount)
            if kind == "return":
                report.add("returns_paid_amount", line.paid)

    # -- findings

    def _report_codes(self, names_by_code: dict[str, dict[str, list[int]]]) -> None:
        for code, names in names_by_code.items():
            if len(names) < 2:
                continue
            self.report.shared_codes[code] = {name: rows for name, rows in names.items()}
            described = "; ".join(f"{name} (rows {_rows_text(rows)})" for name, rows in names.items())
            self.report.findings.append(f"{self._label('sku')} {code} has {len(names)} names: {described}")
        self.report.counts["codes_with_several_names"] = len(self.report.shared_codes)

    def _findings(self) -> None:
        report, profile = self.report, self.profile
        if report.counts["receipts_time_assumed"]:
            report.findings.append(
                f"time: {report.counts['receipts_time_assumed']} receipts have a date only; they are stamped at "
                f"{profile.receipts.time_of_day.strftime('%H:%M')} store time and carry time_assumed: true"
            )
        for store in sorted(self.unmapped_stores):
            report.findings.append(
                f"store {store!r} has no store mapping (source {profile.source}); its receipts are sent for "
                f"StorePulse store {store!r} (an unknown store ends in the dead letters)"
            )
        if self.paid_above_list:
            report.counts["rows_paid_above_list"] = len(self.paid_above_list)
            report.findings.append(
                f"{len(self.paid_above_list)} rows paid more than their list amount ({self._label('paid_amount')} > "
                f"{self._label('list_amount')}); their lines are stored at the paid amount without a discount: rows "
                f"{_rows_text(self.paid_above_list)}"
            )
        if self.wrong_weekdays:
            report.counts["weekday_labels_wrong"] = len(self.wrong_weekdays)
            report.findings.append(
                f"{len(self.wrong_weekdays)} rows carry a weekday label that does not match their date; the date is "
                "used and the label ignored"
            )
        if self.rounded_unit_prices:
            report.counts["unit_prices_rounded"] = self.rounded_unit_prices
            report.findings.append(
                f"{self.rounded_unit_prices} lines have an amount that is no whole number of cents per unit; their "
                "unit price is rounded half up (the amount is kept exact)"
            )
        for name in ("unit_price", "list_amount", "paid_amount"):
            if report.counts[f"{name}_rounded_to_cents"]:
                report.findings.append(
                    f"{report.counts[f'{name}_rounded_to_cents']} {name} cells had more than 2 decimals; rounded to "
                    "cents, half up"
                )
        if report.refused_rows:
            report.findings.append(
                f"{len(report.refused_rows)} rows refused (listed with their row numbers); the rest are imported"
            )


def _rows_text(rows: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(row) for row in rows[:limit])
    return shown + (f", ... ({len(rows)} rows)" if len(rows) > limit else "")
