"""POS database pull: rows of a till's own database (思迅 t_rm_saleflow and the like) as receipts.

A profile (YAML, `seeds/import_profiles/NAME.db.yaml`) names the database, a query with a
`:watermark` parameter, the watermark column and how rows become receipts. Each pull:

1. reads the saved watermark W of the profile (`import_watermarks`), and runs the query with
   `:watermark` = W − overlap (the profile's `start` on the first pull). The overlap re-reads
   rows a till committed late under an older watermark; what was already stored comes back as
   duplicates, because event ids are built from the rows' natural key;
2. groups the rows into receipts by the profile's key (store + flow_no), one receipt per kind
   (sale rows and return rows of one flow are two receipts);
3. delivers the receipts chunk by chunk, and saves the new watermark (the largest value read)
   only with the last chunk: in the same transaction when storing locally, after every batch
   was answered when sending to a remote StorePulse. A pull killed half-way is read again from
   the old watermark on restart: duplicates, never doubles, nothing lost.

A receipt is immutable once stored: a row added to an already stored flow later is a duplicate
of that receipt. Rows of one flow therefore must share the watermark value (思迅 writes a flow
at checkout with one oper_date); the report counts flows whose rows straddle values.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from adapters.sources.base import MAX_LINES, AdapterContext, Conversion, ImportReport, cents, natural_id
from adapters.sources.importer import Destination, ImportFailed, ImportOutcome, Progress, deliver
from ingest.db import normalise_url, session_scope

PROFILE_DIR = Path(__file__).resolve().parents[2] / "seeds" / "import_profiles"
PROFILE_SUFFIX = ".db.yaml"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ProfileError(ImportFailed):
    """A profile that cannot be used; the message names the file and field."""


class WatermarkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str
    type: Literal["datetime", "integer"] = "datetime"
    # datetime: minutes re-read before the saved watermark; integer: that many values back.
    overlap: int = Field(default=0, ge=0)
    start: str | int = Field(default="1900-01-01 00:00:00", description="the watermark of the first pull")


class LineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: str
    qty: str
    amount: str
    unit_price: str | None = None
    line_no: str | None = None


class ReceiptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: list[str] = Field(min_length=1, description="columns whose values make one receipt")
    store: str
    receipt_id: str
    occurred_at: str
    terminal: str | None = None
    terminal_default: str = "1"
    staff: str | None = None
    time_zone: str | None = None
    line: LineSpec
    kind_column: str | None = None
    sale_values: list[str] = Field(default_factory=lambda: ["A"])
    return_values: list[str] = Field(default_factory=lambda: ["B"])


class DbProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    database_url: str
    query: str
    watermark: WatermarkSpec
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    interval_seconds: float = Field(default=60.0, gt=0)
    receipt: ReceiptSpec

    @field_validator("query")
    @classmethod
    def _has_watermark(cls, value: str) -> str:
        if ":watermark" not in value:
            raise ValueError("the query must compare the watermark column with :watermark")
        return value

    @property
    def source_name(self) -> str:
        return f"db:{self.name}"

    def resolved_url(self) -> str:
        """The database URL with ${VAR} replaced from the environment (passwords stay out of the file)."""

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ProfileError(f"database_url: environment variable {name} is not set (profile {self.name})")
            return os.environ[name]

        return _ENV.sub(value, self.database_url)


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    return PROFILE_DIR / f"{name_or_path}{PROFILE_SUFFIX}"


def load_profile(name_or_path: str) -> DbProfile:
    """A profile by name (seeds/import_profiles/NAME.db.yaml) or by path."""
    path = profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = sorted(p.name.removesuffix(PROFILE_SUFFIX) for p in PROFILE_DIR.glob(f"*{PROFILE_SUFFIX}"))
        raise ProfileError(
            f"--profile: no database profile {name_or_path!r} ({path}; shipped: {', '.join(known) or 'none'})"
        ) from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of profile fields")
    try:
        return DbProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProfileError(f"{path}: {where}: {first['msg']}") from None


# --- watermarks ---------------------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None) if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
    return datetime.fromisoformat(str(value).strip())


def watermark_text(profile: DbProfile, value: Any) -> str:
    if profile.watermark.type == "integer":
        return str(int(value))
    return _as_datetime(value).isoformat(sep=" ")


def query_parameter(profile: DbProfile, saved: str | None, dialect: str) -> Any:
    """The `:watermark` of the next pull: the saved value less the overlap, typed for the source database."""
    spec = profile.watermark
    if spec.type == "integer":
        return int(saved) - spec.overlap if saved is not None else int(spec.start)
    moment = _as_datetime(saved) - timedelta(minutes=spec.overlap) if saved is not None else _as_datetime(spec.start)
    # SQLite keeps times as text: compare text with text in the column's own format.
    return moment.strftime("%Y-%m-%d %H:%M:%S") if dialect == "sqlite" else moment


def saved_watermark(profile: DbProfile, *, session: Session) -> str | None:
    from ingest.models import ImportWatermark

    row = session.get(ImportWatermark, profile.name)
    return row.watermark if row is not None else None


def save_watermark(profile: DbProfile, watermark: str, rows: int, *, session: Session) -> None:
    """Move the profile's watermark forward (never back: a re-read overlap is older)."""
    from ingest.models import ImportWatermark

    row = session.get(ImportWatermark, profile.name, with_for_update=True)
    now = datetime.now(UTC)
    if row is None:
        session.add(ImportWatermark(profile=profile.name, watermark=watermark, updated_at=now, rows_total=rows))
        return
    if row.watermark is None or _later(profile, watermark, row.watermark):
        row.watermark = watermark
    row.updated_at = now
    row.rows_total = (row.rows_total or 0) + rows


def _later(profile: DbProfile, new: str, old: str) -> bool:
    if profile.watermark.type == "integer":
        return int(new) > int(old)
    return _as_datetime(new) > _as_datetime(old)


# --- rows into receipts -------------------------------------------------------------------------


@dataclass
class PulledRows:
    rows: list[dict[str, Any]]
    highest: str | None


def read_rows(profile: DbProfile, source: Engine, parameter: Any) -> PulledRows:
    """All rows from `parameter` on, streamed in batches; the highest watermark value among them."""
    rows: list[dict[str, Any]] = []
    highest: Any = None
    column = profile.watermark.column
    with source.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(
            text(profile.query), {"watermark": parameter}
        )
        while batch := result.mappings().fetchmany(profile.batch_size):
            for row in batch:
                values = dict(row)
                if column not in values:
                    raise ProfileError(f"watermark.column: the query returns no column {column!r}")
                value = values[column]
                if value is not None and (highest is None or _later(profile, watermark_text(profile, value),
                                                                       watermark_text(profile, highest))):  # fmt: skip
                    highest = value
                rows.append(values)
    return PulledRows(rows, watermark_text(profile, highest) if highest is not None else None)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _decimal(value: Any, what: str) -> Decimal:
    try:
        number = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{what} {value!r} is not a number")
    return number


def convert_rows(rows: Sequence[dict[str, Any]], profile: DbProfile, *, context: AdapterContext) -> Conversion:
    """Rows into receipt events: one per (key, kind), lines in row order; rows that cannot be read are reported."""
    spec = profile.receipt
    report = ImportReport(source=profile.source_name, file=f"profile {profile.name}")
    groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
    flow_times: dict[tuple[str, ...], set[str]] = {}
    for number, row in enumerate(rows, start=1):
        report.counts["rows"] += 1
        where = f"{profile.name} row {number} ({', '.join(f'{k}={_text(row.get(k))}' for k in spec.key)})"
        missing = [c for c in (*spec.key, spec.store, spec.receipt_id, spec.occurred_at, spec.line.sku,
                               spec.line.qty, spec.line.amount) if _text(row.get(c)) == ""]  # fmt: skip
        if missing:
            report.skip(where, f"empty {', '.join(dict.fromkeys(missing))}")
            continue
        kind = "sale"
        if spec.kind_column is not None:
            marker = _text(row.get(spec.kind_column))
            if marker in spec.return_values:
                kind = "return"
            elif marker not in spec.sale_values:
                report.skip(where, f"{spec.kind_column} {marker!r} is neither a sale {spec.sale_values} "
                                   f"nor a return {spec.return_values}")  # fmt: skip
                continue
        key = (*(_text(row.get(k)) for k in spec.key), kind)
        groups.setdefault(key, []).append((number, row))
        flow_times.setdefault(key[:-1], set()).add(_text(row.get(spec.occurred_at)))
    straddling = sum(1 for times in flow_times.values() if len(times) > 1)
    if straddling:
        report.findings.append(
            f"{straddling} receipt(s) have rows with different {spec.occurred_at} values; each takes its "
            "earliest, and rows added to a stored receipt later are duplicates of it"
        )
    events: list[dict[str, Any]] = []
    for key, members in groups.items():
        event = _receipt(key, members, profile, context, report)
        if event is not None:
            events.append(event)
    return Conversion(events, report)


def _receipt(
    key: tuple[str, ...],
    members: list[tuple[int, dict[str, Any]]],
    profile: DbProfile,
    context: AdapterContext,
    report: ImportReport,
) -> dict[str, Any] | None:
    spec = profile.receipt
    kind = key[-1]
    first_number, first = members[0]
    named_key = ", ".join(f"{k}={v}" for k, v in zip(spec.key, key, strict=False))
    where = f"{profile.name} rows {first_number}.. ({named_key})"
    external_store = _text(first[spec.store])
    store_id = context.map("store", external_store) or external_store
    sign = Decimal(-1) if kind == "return" else Decimal(1)
    lines: list[dict[str, Any]] = []
    rounded = 0
    try:
        moments = [_as_datetime(row[spec.occurred_at]) for _, row in members]
        for position, (_, row) in enumerate(members, start=1):
            qty = abs(_decimal(row[spec.line.qty], spec.line.qty)) * sign
            raw_amount = abs(_decimal(row[spec.line.amount], spec.line.amount)) * sign
            amount = cents(raw_amount)
            rounded += amount != raw_amount
            if qty == 0:
                raise ValueError(f"{spec.line.qty} is 0")
            if spec.line.unit_price is not None and _text(row.get(spec.line.unit_price)):
                unit_price = cents(abs(_decimal(row[spec.line.unit_price], spec.line.unit_price)))
            else:
                unit_price = cents(abs(amount / qty))
            external_sku = _text(row[spec.line.sku])
            line_no = int(_decimal(row[spec.line.line_no], spec.line.line_no)) if spec.line.line_no else position
            lines.append({
                "line_no": line_no, "sku": context.map("sku", external_sku) or external_sku,
                "qty": str(qty.normalize() if qty == qty.to_integral_value() else qty), "unit_price": str(unit_price),
                "amount": str(amount),
            })  # fmt: skip
    except ValueError as exc:
        report.skip(where, f"receipt skipped: {exc}")
        report.counts["rows skipped"] += len(members)
        return None
    if len(lines) > MAX_LINES:
        report.skip(where, f"receipt skipped: {len(lines)} lines, more than the {MAX_LINES} a receipt may have")
        return None
    zone = context.zone(store_id) if spec.time_zone is None else AdapterContext(default_zone=spec.time_zone).zone("")
    moment = min(moments)
    occurred = moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
    total = sum((Decimal(line["amount"]) for line in lines), Decimal("0.00"))
    receipt_no = _text(first[spec.receipt_id])
    terminal_external = _text(first.get(spec.terminal)) if spec.terminal else ""
    event: dict[str, Any] = {
        "type": "receipt",
        "event_id": natural_id(profile.name, *key),
        "store_id": store_id,
        "terminal_id": terminal_external or spec.terminal_default,
        "receipt_id": receipt_no,
        "occurred_at": occurred.isoformat(),
        "kind": kind,
        "lines": lines,
        "total": str(total),
        "source": {"name": profile.source_name, "store": external_store[:64], "sequence": receipt_no[:64]},
    }
    if spec.staff and _text(first.get(spec.staff)):
        external_staff = _text(first[spec.staff])
        event["staff_id"] = context.map("staff", external_staff) or external_staff
        event["source"]["operator"] = external_staff[:64]
    if terminal_external:
        event["source"]["workstation"] = terminal_external[:64]
    report.counts[f"receipts {kind}"] += 1
    report.counts["lines"] += len(lines)
    report.add(f"{kind} amount", total)
    if rounded:
        report.counts["amounts rounded to cents"] += rounded
    return event


# --- one pull, and the loop ---------------------------------------------------------------------


def source_engine(profile: DbProfile) -> Engine:
    url = normalise_url(profile.resolved_url())
    return create_engine(url, pool_pre_ping=True)


@dataclass
class PullResult:
    outcome: ImportOutcome
    rows: int
    watermark_before: str | None
    watermark_after: str | None


def pull_once(
    profile: DbProfile,
    *,
    store: Engine,
    context: AdapterContext,
    destination: Destination | None,
    source: Engine | None = None,
    progress: Progress | None = None,
    on_converted: Callable[[Conversion], None] | None = None,
) -> PullResult:
    """One increment: read from the saved watermark − overlap, deliver, then save the new watermark.

    `store` keeps the watermark (the StorePulse database; with --to, the local one). With
    `destination` None (a dry run) nothing is delivered and the watermark stays.
    """
    own_source = source is None
    source = source or source_engine(profile)
    try:
        with session_scope(store) as session:
            before = saved_watermark(profile, session=session)
        pulled = read_rows(profile, source, query_parameter(profile, before, source.dialect.name))
    finally:
        if own_source:
            source.dispose()
    conversion = convert_rows(pulled.rows, profile, context=context)
    if on_converted is not None:
        on_converted(conversion)
    if destination is None:
        return PullResult(deliver(conversion, None), len(pulled.rows), before, before)
    after_value = pulled.highest or before
    local = getattr(destination, "engine", None) is store

    def save(session: Session | None) -> None:
        if after_value is None:
            return
        if session is not None and local:
            save_watermark(profile, after_value, len(pulled.rows), session=session)
            return
        with session_scope(store) as own:
            save_watermark(profile, after_value, len(pulled.rows), session=own)

    outcome = deliver(conversion, destination, after=save, progress=progress)
    return PullResult(outcome, len(pulled.rows), before, after_value if outcome.error is None else before)


def pull_loop(
    profile: DbProfile,
    *,
    store: Engine,
    context_for: Callable[[], AdapterContext],
    destination: Destination,
    stop: threading.Event,
    on_pull: Callable[[PullResult], None],
    interval_s: float | None = None,
) -> int:
    """Pull every `interval_s` until `stop` is set; returns 1 when the last pull failed, else 0."""
    status = 0
    while not stop.is_set():
        try:
            result = pull_once(profile, store=store, context=context_for(), destination=destination)
        except ProfileError:
            raise
        except Exception as exc:  # the source database is down: try again at the next interval
            on_pull(PullResult(ImportOutcome(ImportReport(profile.source_name), error=f"pull: {exc}"), 0, None, None))
            status = 1
        else:
            on_pull(result)
            status = 1 if result.outcome.failed else 0
        stop.wait(interval_s if interval_s is not None else profile.interval_seconds)
    return status


def counts_summary(result: PullResult) -> str:
    delivered: Counter[str] = result.outcome.delivery
    return (
        f"{result.rows} rows, watermark {result.watermark_before or '-'} → {result.watermark_after or '-'}, "
        f"events accepted {delivered['accepted']}, duplicate {delivered['duplicate']}, "
        f"rejected {delivered['rejected']}"
    )
