"""Mapping profiles of the spreadsheet and CSV sales import (seeds/import_profiles/*.yaml).

A profile says how one back office's export reads: the file kind and encoding, which column
holds which receipt field, how rows group into receipts, the time of day of date-only rows, and
the store the rows belong to. docs/sales-import.md describes every key. A bad profile is refused
whole, each problem as ``file:line: field: reason``.
"""

from __future__ import annotations

import re
from datetime import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.yaml_source import compose_yaml, line_of

PROFILES_DIR = Path(__file__).resolve().parents[2] / "seeds" / "import_profiles"

# The receipt fields a column can feed; docs/sales-import.md explains each.
RECEIPT_FIELDS: tuple[str, ...] = (
    "date",
    "time",
    "store",
    "receipt",
    "terminal",
    "sku",
    "name",
    "qty",
    "unit_price",
    "list_amount",
    "paid_amount",
    "member",
    "staff",
)
GROUP_FIELDS: tuple[str, ...] = ("store", "date", "member", "staff", "terminal")
AMOUNT_FIELDS: tuple[str, ...] = ("unit_price", "list_amount", "paid_amount")
_PROFILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$"


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file, line, field and reason."""


class _Strict(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    kind: Literal["xlsx", "csv"]
    sheet: str | None = None
    encoding: Literal["auto", "utf-8", "utf-8-sig", "gb18030", "gbk"] = "auto"
    delimiter: str = Field(",", min_length=1, max_length=1)
    header_row: int = Field(1, ge=1, le=1000)


class Columns(_Strict):
    """Receipt field → the column header that holds it (exactly as the export writes it)."""

    date: str = Field(min_length=1)
    time: str | None = None
    store: str | None = None
    receipt: str | None = None
    terminal: str | None = None
    sku: str = Field(min_length=1)
    name: str | None = None
    qty: str = Field(min_length=1)
    unit_price: str | None = None
    list_amount: str | None = None
    paid_amount: str | None = None
    member: str | None = None
    staff: str | None = None

    @model_validator(mode="after")
    def _priced(self) -> Columns:
        if not any(getattr(self, name) for name in AMOUNT_FIELDS):
            raise ValueError("map at least one of unit_price, list_amount, paid_amount: a line needs an amount")
        headers = [(name, header) for name, header in self.mapped().items()]
        seen: dict[str, str] = {}
        for name, header in headers:
            if header in seen:
                raise ValueError(f"{name}: column {header!r} is already mapped to {seen[header]}")
            seen[header] = name
        return self

    def mapped(self) -> dict[str, str]:
        return {name: header for name in RECEIPT_FIELDS if (header := getattr(self, name))}


class StoreSpec(_Strict):
    # The source's own store id for every row, when the export has no store column; mapped to a
    # StorePulse store through the store mappings (source_mappings or --store-map).
    fixed: str | None = Field(None, min_length=1, max_length=64)


class ReceiptSpec(_Strict):
    group_by: list[Literal["store", "date", "member", "staff", "terminal"]] | None = Field(None, min_length=1)
    time_of_day: time = time(12, 0)

    @field_validator("time_of_day", mode="before")
    @classmethod
    def _clock_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 12:00 as the base-60 number 720.
            raise ValueError('write the time in quotes, e.g. "12:00" (unquoted, YAML reads it as a number)')
        if isinstance(value, str) and not re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", value.strip()):
            raise ValueError(f"{value!r} is not a time of day like 12:00")
        return value


class SalesProfile(_Strict):
    name: str = Field(pattern=_PROFILE_NAME)
    description: str | None = None
    source_name: str | None = Field(None, min_length=1, max_length=64)
    file: FileSpec
    columns: Columns
    required: list[str] | None = None
    store: StoreSpec = StoreSpec()
    terminal: str = Field("1", min_length=1, max_length=64)
    receipts: ReceiptSpec = ReceiptSpec()
    date_format: str | None = None

    @field_validator("required")
    @classmethod
    def _known_fields(cls, value: list[str] | None) -> list[str] | None:
        for index, name in enumerate(value or ()):
            if name not in RECEIPT_FIELDS:
                raise ValueError(f"item {index}: {name!r} is not a receipt field ({', '.join(RECEIPT_FIELDS)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SalesProfile:
        mapped = self.columns.mapped()
        for name in self.required or ():
            if name not in mapped:
                raise ValueError(f"required: {name!r} has no column in columns")
        if self.columns.store is None and self.store.fixed is None:
            raise ValueError("store: map columns.store or set store.fixed (the export's store for every row)")
        if self.columns.receipt is None and not self.receipts.group_by:
            raise ValueError(
                "receipts.group_by: the export has no receipt column (columns.receipt), so name the fields "
                "that make one receipt, e.g. [store, date, member]"
            )
        for name in self.receipts.group_by or ():
            if name not in ("store", "date") and name not in mapped:
                raise ValueError(f"receipts.group_by: {name!r} has no column in columns")
        if self.file.kind == "csv" and self.file.sheet is not None:
            raise ValueError("file.sheet: a CSV file has no sheets")
        return self

    @property
    def source(self) -> str:
        return self.source_name or f"sales:{self.name}"

    def required_fields(self) -> tuple[str, ...]:
        """The fields whose empty cell refuses a row (default: every mapped one but time, name, member, staff)."""
        if self.required is not None:
            return tuple(self.required)
        optional = {"time", "name", "member", "staff", "terminal"}
        return tuple(name for name in self.columns.mapped() if name not in optional)


def _problems(exc: ValidationError, root: yaml.Node | None, source: str) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (misspelt?); docs/sales-import.md lists the keys"
        elif error["type"] == "missing":
            message = "missing; this key is required"
        # A message that starts with "field: " names a field below the location (cross-field checks).
        match = re.match(r"^([a-z_]+(?:\.[a-z_]+)?): (.*)$", message)
        if match and error["type"] == "value_error":
            loc = [*loc, *match.group(1).split(".")]
            message = match.group(2)
        where = ".".join(str(part) for part in loc) or "profile"
        line = line_of(root, loc)
        problems.append(f"{source}:{line}: {where}: {message}" if line else f"{source}: {where}: {message}")
    return "; ".join(problems)


def parse_profile(text: str, source: str = "<profile>", *, default_name: str | None = None) -> SalesProfile:
    """A profile from YAML text; `source` names the file in errors."""
    content, root = compose_yaml(text, source, ProfileError)
    if not isinstance(content, dict):
        raise ProfileError(f"{source}:1: profile: expected a mapping of profile keys (file, columns, ...)")
    if default_name is not None:
        content.setdefault("name", default_name)
    try:
        return SalesProfile.model_validate(content)
    except ValidationError as exc:
        raise ProfileError(_problems(exc, root, source)) from None


def profile_path(name_or_path: str | Path, directory: Path = PROFILES_DIR) -> Path:
    """A shipped profile by name (``chaoyang_pharmacy``), or a profile file by its path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ProfileError(f"{candidate}: no such profile file")
        return candidate
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(shipped_profiles(directory)) or "none"
        raise ProfileError(
            f"profile: no sales import profile named {str(name_or_path)!r} in {directory} (known: {known})"
        )
    return path


def load_profile(name_or_path: str | Path, directory: Path = PROFILES_DIR) -> SalesProfile:
    path = profile_path(name_or_path, directory)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start}); save the profile as UTF-8") from None
    return parse_profile(text, str(path), default_name=path.stem)


def shipped_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    """The sales profiles of a folder; the POS database pull's profiles (NAME.db.yaml) live beside them."""
    return sorted(path.stem for path in directory.glob("*.yaml") if not path.name.endswith(".db.yaml"))
