"""What every source adapter is: foreign input in, contract v1 events and a report out.

An adapter never touches the database. It turns a till's POSLog, a back office's spreadsheet or
a POS database's rows into plain event dicts (ready for `ingest.service.ingest_payloads`, an
HTTP POST or an MQTT publish) and reports everything it left out, with where and why. Event ids
come from the source's natural key (`natural_id`), so importing the same input again yields
the same ids: duplicates, never doubles.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

MAX_ID = 64  # the contract's longest id
MAX_LINES = 1000  # the contract's limit per receipt
CENT = Decimal("0.01")


def natural_id(*parts: object) -> str:
    """A deterministic event id from a source's natural key (readable when it fits in 64 characters)."""
    text = ":".join("" if part is None else str(part).strip() for part in parts)
    if len(text) <= MAX_ID and "\x00" not in text:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:32]
    prefix = str(parts[0])[: MAX_ID - len(digest) - 1] if parts else "id"
    return f"{prefix}:{digest}"


def cents(value: Decimal) -> Decimal:
    """Money as the contract carries it: two decimals, half up (sources with 3 or 5 decimals)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Skipped:
    """One item left out: where it is (file:line, file#element path, sheet!row) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ImportReport:
    """What an adapter made of one input: counts, what it left out, and findings worth a look."""

    source: str
    file: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    skipped: list[Skipped] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    totals: dict[str, Decimal] = field(default_factory=dict)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(Skipped(where, reason))

    def add(self, name: str, amount: Decimal) -> None:
        self.totals[name] = self.totals.get(name, Decimal(0)) + amount

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file": self.file,
            "counts": dict(sorted(self.counts.items())),
            "totals": {k: str(v) for k, v in sorted(self.totals.items())},
            "skipped": [{"where": s.where, "reason": s.reason} for s in self.skipped],
            "findings": list(self.findings),
        }

    def merge(self, other: ImportReport) -> None:
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)
        self.findings.extend(other.findings)
        for name, amount in other.totals.items():
            self.add(name, amount)


@dataclass
class Conversion:
    """The events an adapter made (contract v1 dicts, in input order) and its report."""

    events: list[dict[str, Any]]
    report: ImportReport


@dataclass
class AdapterContext:
    """What an adapter may know of StorePulse without a database: mappings and time zones.

    `mappings[kind][external_id]` → StorePulse id, for kind `store`, `sku`, `staff` (from the
    `source_mappings` master data or a `--store-map` file); `store_zones[store_id]` → IANA zone,
    for source times without an offset; `default_zone` for stores the caller did not list.
    """

    mappings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    store_zones: Mapping[str, str] = field(default_factory=dict)
    default_zone: str = "Asia/Shanghai"
    prices_include_tax: bool = True

    def map(self, kind: str, external_id: str | None) -> str | None:
        if external_id is None:
            return None
        return self.mappings.get(kind, {}).get(str(external_id).strip())

    def zone(self, store_id: str) -> ZoneInfo:
        return ZoneInfo(self.store_zones.get(store_id, self.default_zone))


class SourceAdapter(ABC):
    """Turns one input (a file, or rows of a query) into contract events and a report."""

    name: ClassVar[str]

    @abstractmethod
    def convert(self, path: Path, *, context: AdapterContext) -> Conversion:
        """Read `path` and return its events and report; never touches the database."""


_REGISTRY: dict[str, type[SourceAdapter]] = {}


def register_adapter(adapter: type[SourceAdapter]) -> type[SourceAdapter]:
    """Class decorator: make the adapter available by its `name`."""
    _REGISTRY[adapter.name] = adapter
    return adapter


def get_adapter(name: str, **options: Any) -> SourceAdapter:
    try:
        return _REGISTRY[name](**options)
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise LookupError(f"adapter: no source adapter named {name!r} (known: {known})") from None


def adapter_names() -> Iterable[str]:
    return sorted(_REGISTRY)
