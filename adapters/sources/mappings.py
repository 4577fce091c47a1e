"""Which StorePulse store, SKU and staff member a source's own ids stand for, for an adapter.

Two places say it, and a file wins over the database:

- the `source_mappings` master data (`storepulse masterdata import source_mappings.csv`), rows of
  kind (store / sku / staff), source (`poslog`, ... or `*` for every source), external id and
  target id; a row for the adapter's own source wins over a `*` row;
- a mapping file passed with `--store-map FILE`: the same four columns as CSV, or YAML (see
  docs/poslog.md). A bad file stops the import with `file:line: column: reason`.

`load_context` also reads each store's time zone, for source times without an offset.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.sources.base import AdapterContext
from ingest.masterdata import SourceMappingRow
from ingest.models import SourceMapping, Store
from ingest.settings import get_settings

MAPPING_COLUMNS = ("kind", "source", "external_id", "target_id")
ANY_SOURCE = "*"


class MappingFileError(ValueError):
    """A mapping file that cannot be used; every problem is named as `file:line: column: reason`."""


@dataclass(frozen=True)
class MappingEntry:
    kind: str
    source: str
    external_id: str
    target_id: str
    where: str  # file:line, or "database"


def _validated(record: dict[str, Any], where: str, errors: list[str]) -> MappingEntry | None:
    try:
        row = SourceMappingRow.model_validate(record)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            column = ".".join(str(p) for p in error["loc"]) or "row"
            message = "required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
            errors.append(f"{where}: {column}: {message}")
        return None
    return MappingEntry(row.kind, row.source, row.external_id, row.target_id, where)


def _read_csv(path: Path, errors: list[str]) -> list[MappingEntry]:
    entries = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        unknown = [name for name in header if name not in MAPPING_COLUMNS]
        missing = [name for name in ("kind", "external_id", "target_id") if name not in header]
        if unknown or missing:
            problems = [f"unknown column(s) {', '.join(unknown)}"] * bool(unknown) + [
                f"missing column(s) {', '.join(missing)}"
            ] * bool(missing)
            errors.append(f"{path}:1: header: {'; '.join(problems)} (expected {', '.join(MAPPING_COLUMNS)})")
            return []
        reader.fieldnames = header
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                errors.append(f"{where}: row: more cells than the header has columns")
                continue
            entry = _validated({k: v for k, v in record.items() if k}, where, errors)
            if entry is not None:
                entries.append(entry)
    return entries


def _scalar(node: yaml.Node) -> str | None:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def _read_yaml(path: Path, errors: list[str]) -> list[MappingEntry]:
    """Either `{source: poslog, store: {"9": S001}, sku: {...}, staff: {...}}` or a list of rows."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        errors.append(f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})")
        return []
    if root is None:
        return []
    entries: list[MappingEntry] = []
    rows: Iterable[yaml.Node] = ()
    if isinstance(root, yaml.SequenceNode):
        rows = root.value
    elif isinstance(root, yaml.MappingNode):
        default_source = ANY_SOURCE
        for key_node, value_node in root.value:
            if _scalar(key_node) == "source":
                default_source = _scalar(value_node) or ANY_SOURCE
        for key_node, value_node in root.value:
            key = _scalar(key_node)
            where = f"{path}:{key_node.start_mark.line + 1}"
            if key == "source":
                continue
            if key == "mappings" and isinstance(value_node, yaml.SequenceNode):
                rows = value_node.value
                continue
            if not isinstance(value_node, yaml.MappingNode):
                errors.append(f"{where}: {key}: expected store, sku, staff or mappings, each a mapping of ids")
                continue
            for external_node, target_node in value_node.value:
                entry = _validated(
                    {
                        "kind": key,
                        "source": default_source,
                        "external_id": _scalar(external_node),
                        "target_id": _scalar(target_node),
                    },
                    f"{path}:{external_node.start_mark.line + 1}",
                    errors,
                )
                if entry is not None:
                    entries.append(entry)
    else:
        errors.append(f"{path}:1: expected a mapping (store/sku/staff) or a list of rows")
    for row in rows:
        where = f"{path}:{row.start_mark.line + 1}"
        if not isinstance(row, yaml.MappingNode):
            errors.append(f"{where}: row: expected kind, source, external_id, target_id")
            continue
        record = {_scalar(k) or "": _scalar(v) for k, v in row.value}
        entry = _validated(record, where, errors)
        if entry is not None:
            entries.append(entry)
    return entries


def read_mapping_file(path: Path) -> list[MappingEntry]:
    """Read a `--store-map` file (.csv, .yaml, .yml) or raise MappingFileError naming file:line."""
    if not path.is_file():
        raise MappingFileError(f"{path}: no such mapping file")
    errors: list[str] = []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        entries = _read_csv(path, errors)
    elif suffix in (".yaml", ".yml"):
        entries = _read_yaml(path, errors)
    else:
        raise MappingFileError(f"{path}: unsupported mapping file type {suffix!r} (use .csv, .yaml or .yml)")
    seen: dict[tuple[str, str, str], MappingEntry] = {}
    for entry in entries:
        key = (entry.kind, entry.source, entry.external_id)
        earlier = seen.get(key)
        if earlier is not None and earlier.target_id != entry.target_id:
            errors.append(
                f"{entry.where}: external_id: {entry.kind} {entry.external_id!r} is mapped to "
                f"{earlier.target_id!r} at {earlier.where} and to {entry.target_id!r} here"
            )
        seen.setdefault(key, entry)
    if errors:
        raise MappingFileError("\n".join(errors))
    return entries


def mappings_for(entries: Iterable[MappingEntry], source: str) -> dict[str, dict[str, str]]:
    """kind → external id → target id for one source; its own rows win over `*` rows, later over earlier."""
    mappings: dict[str, dict[str, str]] = {}
    ordered = sorted(
        (entry for entry in entries if entry.source in (source, ANY_SOURCE)),
        key=lambda entry: entry.source != ANY_SOURCE,  # stable: `*` rows first, then overridden
    )
    for entry in ordered:
        mappings.setdefault(entry.kind, {})[entry.external_id] = entry.target_id
    return mappings


def stored_mappings(*, session: Session, source: str) -> list[MappingEntry]:
    rows = session.scalars(select(SourceMapping).where(SourceMapping.source.in_((source, ANY_SOURCE))))
    return [MappingEntry(r.kind, r.source, r.external_id, r.target_id, "database") for r in rows]


def load_context(
    *,
    session: Session | None,
    source: str,
    mapping_files: Sequence[Path] = (),
) -> AdapterContext:
    """The adapter's view of StorePulse: mappings (database, then files on top) and store time zones.

    Without a session (a dry run on a store PC) only the files count and every store is read in
    the chain's zone (`Settings.timezone`).
    """
    settings = get_settings()
    entries: list[MappingEntry] = stored_mappings(session=session, source=source) if session is not None else []
    stored = mappings_for(entries, source)
    from_files = mappings_for([entry for path in mapping_files for entry in read_mapping_file(path)], source)
    for kind, mapping in from_files.items():
        stored.setdefault(kind, {}).update(mapping)
    zones: dict[str, str] = {}
    if session is not None:
        zones = {store_id: zone for store_id, zone in session.execute(select(Store.store_id, Store.timezone))}
    return AdapterContext(
        mappings=stored,
        store_zones=zones,
        default_zone=settings.timezone,
        prices_include_tax=settings.prices_include_tax,
    )
