"""Master-data import from CSV and XLSX: regions, stores, terminals, sensors, SKUs, staff, members.

Every row is validated first; a file with errors writes nothing unless the caller asks to skip
bad rows. Rows are upserted by their key, so re-importing a file updates and never duplicates.
The columns of each kind are documented in docs/masterdata.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.models import Base, Member, Region, SafetyStock, Sensor, Sku, SourceMapping, Staff, Store, Terminal

_TRUE = {"1", "true", "yes", "y", "是", "t", "x"}
_FALSE = {"0", "false", "no", "n", "否", "f", ""}


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a yes/no value (use true/false, 1/0, yes/no, 是/否)")


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


Flag = Annotated[bool, BeforeValidator(_flag)]
Key = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
OptionalText = Annotated[str | None, BeforeValidator(_blank_to_none)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RegionRow(_Row):
    region_id: Key
    name_zh: Name
    name_en: Name


class StoreRow(_Row):
    store_id: Key
    region_id: Key
    name_zh: Name
    name_en: Name
    city: OptionalText = None
    timezone: Annotated[str, BeforeValidator(lambda v: v or "Asia/Shanghai")] = "Asia/Shanghai"
    active: Flag = True

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class TerminalRow(_Row):
    store_id: Key
    terminal_id: Key
    name: OptionalText = None


class SensorRow(_Row):
    store_id: Key
    sensor_id: Key
    name: OptionalText = None
    location: OptionalText = None


class SkuRow(_Row):
    sku: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    name_zh: Name
    name_en: Name
    category: Key
    atc_code: OptionalText = None
    unit_price: Annotated[Decimal | None, BeforeValidator(_blank_to_none)] = None
    is_rx: Flag = False
    flow_controlled: Flag = False
    prompt_triggering: Flag = False
    insurance_eligible: Flag = False

    @field_validator("unit_price")
    @classmethod
    def _price(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and (value < 0 or value.as_tuple().exponent < -2):  # type: ignore[operator]
            raise ValueError("must be ≥ 0 with at most 2 decimals")
        return value


class StaffRow(_Row):
    staff_id: Key
    store_id: Key
    name: Name
    role: Key


class MemberRow(_Row):
    member_id: Key
    name: Name
    home_store_id: Annotated[str | None, BeforeValidator(_blank_to_none)] = None
    phone_last4: Annotated[str | None, BeforeValidator(_blank_to_none), StringConstraints(pattern=r"^\d{4}$")] = None


class SafetyStockRow(_Row):
    store_id: Key  # "*" for the chain-wide default of the SKU
    sku: Key
    safety_stock: Decimal
    lead_time_days: Annotated[int, BeforeValidator(lambda v: 7 if v in ("", None) else v)] = 7

    @field_validator("safety_stock")
    @classmethod
    def _not_negative(cls, value: Decimal) -> Decimal:
        if value < 0 or not value.is_finite():
            raise ValueError("must be a number ≥ 0")
        return value

    @field_validator("lead_time_days")
    @classmethod
    def _lead_time(cls, value: int) -> int:
        if not 0 <= value <= 365:
            raise ValueError("must be between 0 and 365 days")
        return value


class SourceMappingRow(_Row):
    """A till system's own id (POSLog store, item id or GTIN, operator) → a StorePulse id."""

    kind: Literal["store", "sku", "staff"]
    # The adapter the id belongs to (poslog, sales:NAME, db:NAME), or * for every source.
    source: Annotated[str, BeforeValidator(lambda v: v or "*"), StringConstraints(min_length=1, max_length=64)] = "*"
    external_id: Key
    target_id: Key


@dataclass(frozen=True)
class Kind:
    name: str
    row: type[_Row]
    model: type[Base]
    key: tuple[str, ...]
    # (column, kind it refers to) pairs checked before anything is written
    references: tuple[tuple[str, str], ...] = ()
    # a value that refers to nothing on purpose (the chain-wide "*" of safety stock)
    wildcard: str | None = None


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("regions", RegionRow, Region, ("region_id",)),
        Kind("stores", StoreRow, Store, ("store_id",), (("region_id", "regions"),)),
        Kind("terminals", TerminalRow, Terminal, ("store_id", "terminal_id"), (("store_id", "stores"),)),
        Kind("sensors", SensorRow, Sensor, ("store_id", "sensor_id"), (("store_id", "stores"),)),
        Kind("skus", SkuRow, Sku, ("sku",)),
        Kind("staff", StaffRow, Staff, ("staff_id",), (("store_id", "stores"),)),
        Kind("members", MemberRow, Member, ("member_id",), (("home_store_id", "stores"),)),
        Kind(
            "safety_stock",
            SafetyStockRow,
            SafetyStock,
            ("store_id", "sku"),
            (("store_id", "stores"), ("sku", "skus")),
            wildcard="*",
        ),
        Kind("source_mappings", SourceMappingRow, SourceMapping, ("kind", "source", "external_id")),
    )
}
IMPORT_ORDER = tuple(KINDS)


@dataclass
class RowError:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ImportReport:
    kind: str
    source: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    errors: list[RowError] = field(default_factory=list)
    written: bool = False


class MasterDataError(ValueError):
    pass


def detect_kind(name: str, columns: Iterable[str]) -> str:
    stem = Path(name).stem.lower()
    for kind in KINDS:
        if stem == kind or stem.endswith(("-" + kind, "_" + kind)):
            return kind
    present = set(columns)
    for kind, spec in KINDS.items():
        required = {n for n, f in spec.row.model_fields.items() if f.is_required()}
        if required <= present and present <= set(spec.row.model_fields):
            return kind
    raise MasterDataError(
        f"{name}: cannot tell which master data this is; name it after one of {', '.join(KINDS)} or pass --kind"
    )


def read_tables(path: Path, kind: str | None = None) -> list[tuple[str, str, pd.DataFrame, int]]:
    """Return (kind, where, frame, first data line number) per table in the file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        frame.columns = [str(c).strip() for c in frame.columns]
        return [(kind or detect_kind(path.name, frame.columns), "line", frame, 2)]
    if suffix in (".xlsx", ".xlsm"):
        sheets = pd.read_excel(path, sheet_name=None, dtype=str, keep_default_na=False)
        tables = []
        for sheet, frame in sheets.items():
            frame.columns = [str(c).strip() for c in frame.columns]
            if str(sheet).lower() in KINDS:
                sheet_kind = str(sheet).lower()
            elif len(sheets) == 1:
                sheet_kind = kind or detect_kind(path.name, frame.columns)
            else:
                sheet_kind = detect_kind(str(sheet), frame.columns)
            tables.append((sheet_kind, f"sheet {sheet}, row", frame, 2))
        return sorted(tables, key=lambda t: IMPORT_ORDER.index(t[0]))
    raise MasterDataError(f"{path.name}: unsupported file type {suffix!r} (use .csv or .xlsx)")


def _validate(kind: Kind, frame: pd.DataFrame, where: str, first_line: int) -> tuple[list[_Row | None], list[RowError]]:
    rows: list[_Row | None] = []
    errors: list[RowError] = []
    unknown = [c for c in frame.columns if c not in kind.row.model_fields]
    if unknown:
        errors.append(RowError("header", f"unknown column(s) {', '.join(unknown)} for {kind.name}"))
        return [], errors
    seen: dict[tuple[Any, ...], int] = {}
    for offset, record in enumerate(frame.to_dict(orient="records")):
        line = first_line + offset
        try:
            row = kind.row.model_validate(record)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                column = ".".join(str(p) for p in error["loc"]) or "row"
                message = "required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
                errors.append(RowError(f"{where} {line}", f"{column}: {message}"))
            rows.append(None)
            continue
        key = tuple(getattr(row, k) for k in kind.key)
        if key in seen:
            errors.append(RowError(f"{where} {line}", f"{'/'.join(kind.key)}: duplicate of {where} {seen[key]}"))
            rows.append(None)
            continue
        seen[key] = line
        rows.append(row)
    return rows, errors


def _existing_keys(kind: Kind, session: Session) -> set[tuple[Any, ...]]:
    columns = [getattr(kind.model, k) for k in kind.key]
    return {tuple(r) for r in session.execute(select(*columns))}


def import_file(
    path: Path, *, session: Session, kind: str | None = None, skip_bad_rows: bool = False
) -> list[ImportReport]:
    """Validate and upsert every table of a file inside the caller's transaction."""
    if kind is not None and kind not in KINDS:
        raise MasterDataError(f"--kind: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    reports: list[ImportReport] = []
    pending: list[tuple[Kind, ImportReport, list[_Row | None], str, int]] = []
    staged_keys: dict[str, set[str]] = {}
    for table_kind, where, frame, first_line in read_tables(path, kind):
        spec = KINDS[table_kind]
        rows, errors = _validate(spec, frame, where, first_line)
        report = ImportReport(kind=table_kind, source=path.name, rows=len(frame), errors=errors)
        if len(spec.key) == 1:
            staged_keys.setdefault(table_kind, set()).update(str(getattr(r, spec.key[0])) for r in rows if r)
        reports.append(report)
        pending.append((spec, report, rows, where, first_line))

    # References may point into the same file (an XLSX with regions and stores) or the database.
    known: dict[str, set[str]] = {}
    for spec, report, rows, where, first_line in pending:
        for offset, row in enumerate(rows):
            if row is None:
                continue
            for column, target in spec.references:
                value = getattr(row, column)
                if value is None or (spec.wildcard is not None and value == spec.wildcard):
                    continue
                if target not in known:
                    target_spec = KINDS[target]
                    known[target] = {str(k[0]) for k in _existing_keys(target_spec, session)}
                if value not in known[target] and value not in staged_keys.get(target, set()):
                    report.errors.append(
                        RowError(f"{where} {first_line + offset}", f"{column}: unknown {target[:-1]} {value!r}")
                    )
                    rows[offset] = None

    if any(r.errors for r in reports) and not skip_bad_rows:
        return reports
    for spec, report, rows, _where, _first in pending:
        existing = _existing_keys(spec, session)
        for row in rows:
            if row is None:
                continue
            values = row.model_dump()
            key = tuple(values[k] for k in spec.key)
            session.merge(spec.model(**values))
            if key in existing:
                report.updated += 1
            else:
                report.inserted += 1
        session.flush()
        report.written = True
    return reports
