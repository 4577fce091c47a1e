"""Bulk POSLog import: the NCR ACS sample replicated to 1 M sale lines, into a scratch TimescaleDB.

    .venv/bin/python -m bench.poslog_bench                 # 1,000,000 lines (~3-4 min on 2 cores)
    .venv/bin/python -m bench.poslog_bench --lines 200000  # a quicker look

The 51 transactions of ../shared/data/poslog/ncr_acs/POSLog.xml (42 retail, 544 sale lines) are
copied with distinct keys: copy k moves the business day and every timestamp k days after
2017-10-01 (the natural key is store, workstation, business day, sequence, operator), so 1 M
lines span about five years of history, as a chain's back-fill would. The copies are written as
POSLog files of ~50,000 lines each, card signatures (inline SVG in `acs:ElectronicSignature`,
about 11 KB of the sample's 916 KB) included, as a till writes them. Per file:

- conversion: `get_adapter("poslog").convert(file)` (XML → contract events and the report);
- import: the events stored as `storepulse import poslog` stores them, `LocalDestination.deliver`
  (`ingest_payloads` per chunk of 1,000: validation, the COPY writer, the ingest hooks, one commit
  per chunk);
- raw COPY: the same receipts under other event ids, validated and flattened before the clock
  starts, then a plain binary COPY into `receipts` and `receipt_lines` per chunk of 1,000 (no
  staging table, no idempotency): the ceiling. Raw COPY and import alternate file by file, so
  both see tables of the same size.

Target: import ≥ 0.5 × raw COPY (sale lines/s). Conversion is reported separately.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench.common import (
    exit_cleanly_on_sigterm,
    machine_facts,
    print_facts,
    print_table,
    scratch_timescale,
    timed_raw_copy,
)
from ingest.contract import parse_event
from ingest.db import get_engine

NCR_POSLOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "poslog" / "ncr_acs" / "POSLog.xml"
SAMPLE_DAY = "2017-10-01"
LINES_PER_FILE = 50_000
CHUNK = 1_000
RATIO_TARGET = 0.5


def load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def sample_transactions(path: Path) -> tuple[str, list[str]]:
    """The root start tag and the <Transaction> elements of the sample, as text."""
    document = path.read_text(encoding="utf-8")
    root = re.search(r"<POSLog\b[^>]*>", document)
    if root is None:
        raise SystemExit(f"cannot benchmark: {path} has no POSLog root")
    if set(re.findall(r"(?<![0-9])20[0-9]{2}-[0-9]{2}-[0-9]{2}", document)) != {SAMPLE_DAY}:
        raise SystemExit(f"cannot benchmark: {path} is not the one-day sample this benchmark replicates")
    return root.group(0), re.findall(r"<Transaction>.*?</Transaction>", document, flags=re.S)


def replicated(transactions: list[str], copy_no: int) -> str:
    """Copy `copy_no` of the sample's day, `copy_no` days later: a new business day, so new natural keys."""
    day = (date.fromisoformat(SAMPLE_DAY) + timedelta(days=copy_no)).isoformat()
    return "".join(transactions).replace(SAMPLE_DAY, day)


def file_plan(lines_wanted: int, lines_per_copy: int) -> list[range]:
    """The copies each POSLog file holds."""
    copies = math.ceil(lines_wanted / lines_per_copy)
    per_file = max(1, LINES_PER_FILE // lines_per_copy)
    return [range(first, min(copies, first + per_file)) for first in range(0, copies, per_file)]


def write_file(path: Path, root: str, transactions: list[str], copies: range) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(root)
        for copy_no in copies:
            handle.write(replicated(transactions, copy_no))
        handle.write("</POSLog>\n")
    return path


def receipt_lines(events: Sequence[dict[str, Any]]) -> int:
    return sum(len(event["lines"]) for event in events if event["type"] == "receipt")


def raw_copy_seconds(engine: Engine, events: list[dict[str, Any]]) -> float:
    raws = [{**event, "event_id": f"raw:{event['event_id']}"} for event in events]
    return timed_raw_copy(engine, [parse_event(payload) for payload in raws], raws, CHUNK)


def import_seconds(engine: Engine, events: list[dict[str, Any]]) -> float:
    from adapters.sources.importer import LocalDestination

    started = time.perf_counter()
    results = LocalDestination(engine, source="poslog", chunk_size=CHUNK).deliver(events)
    seconds = time.perf_counter() - started
    refused = [result for result in results if result[1] != "accepted"]
    if refused:
        raise RuntimeError(f"{len(refused)} of {len(events)} events not accepted, first: {refused[0]}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="sale lines to import")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    if not NCR_POSLOG.exists():
        raise SystemExit(f"cannot benchmark: {NCR_POSLOG} is missing")

    import adapters.sources.poslog  # noqa: F401  (registers the adapter)
    from adapters.sources.base import AdapterContext, get_adapter

    adapter = get_adapter("poslog")
    context = AdapterContext(mappings={"store": {"9": "S001"}})
    lines_per_copy = receipt_lines(adapter.convert(NCR_POSLOG, context=context).events)

    with scratch_timescale() as url, tempfile.TemporaryDirectory(prefix="storepulse-poslog-bench-") as tmp:
        engine = get_engine(url)
        print_facts(machine_facts(engine))
        root, transactions = sample_transactions(NCR_POSLOG)
        plan = file_plan(args.lines, lines_per_copy)
        print(
            f"{len(plan)} POSLog files of up to {len(plan[0])} copies of the sample ({lines_per_copy} sale lines "
            f"each); load {load()}"
        )
        size = 0
        totals = {"convert": 0.0, "import": 0.0, "raw": 0.0}
        ratios: list[float] = []
        lines_total = receipts_total = 0
        for index, copies in enumerate(plan):
            # Written just before its conversion and removed after it: 1 M lines are ~1.7 GB of XML.
            path = write_file(Path(tmp) / f"ncr_{index:03d}.xml", root, transactions, copies)
            size += path.stat().st_size
            started = time.perf_counter()
            conversion = adapter.convert(path, context=context)
            convert_s = time.perf_counter() - started
            path.unlink()
            events = list(conversion.events)
            lines = receipt_lines(events)
            if index % 2 == 0:
                raw_s = raw_copy_seconds(engine, events)
                import_s = import_seconds(engine, events)
            else:
                import_s = import_seconds(engine, events)
                raw_s = raw_copy_seconds(engine, events)
            totals["convert"] += convert_s
            totals["import"] += import_s
            totals["raw"] += raw_s
            ratios.append(raw_s / import_s)
            lines_total += lines
            receipts_total += len(events)
            print(
                f"file {index + 1}/{len(plan)}: {lines:,} lines; convert {lines / convert_s:,.0f} lines/s, "
                f"import {lines / import_s:,.0f}, raw COPY {lines / raw_s:,.0f} (ratio {raw_s / import_s:.2f}); "
                f"load {load()}",
                flush=True,
            )
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT count(*) FROM receipt_lines WHERE event_id NOT LIKE 'raw:%'")
            ).scalar_one()
        engine.dispose()
    if stored != lines_total:
        raise RuntimeError(f"receipt_lines holds {stored} imported rows, expected {lines_total}")

    rate = {name: lines_total / seconds for name, seconds in totals.items()}
    end_to_end = lines_total / (totals["convert"] + totals["import"])
    print_table(
        f"bulk POSLog import, {lines_total:,} sale lines in {receipts_total:,} receipts, {size / 1e6:,.0f} MB of XML "
        "(TimescaleDB)",
        ["stage", "seconds", "sale lines/s"],
        [
            ["conversion (POSLog adapter, XML → events)", f"{totals['convert']:.1f}", f"{rate['convert']:,.0f}"],
            ["import (validation + writer + hooks + commit)", f"{totals['import']:.1f}", f"{rate['import']:,.0f}"],
            ["conversion + import", f"{totals['convert'] + totals['import']:.1f}", f"{end_to_end:,.0f}"],
            ["raw binary COPY of the same rows", f"{totals['raw']:.1f}", f"{rate['raw']:,.0f}"],
        ],
    )
    ratio = rate["import"] / rate["raw"]
    checks = [
        ["import ≥ 0.5 × raw COPY (all files)", f"{ratio:.2f}", verdict(ratio >= RATIO_TARGET)],
        ["import ≥ 0.5 × raw COPY (median file)", f"{statistics.median(ratios):.2f}",
         verdict(statistics.median(ratios) >= RATIO_TARGET)],
        ["conversion + import, for information", f"{end_to_end / rate['raw']:.2f} × raw COPY", "-"],
    ]  # fmt: skip
    print_table(f"acceptance (load at the end: {load()})", ["target", "measured", "verdict"], checks)
    return 0 if ratio >= RATIO_TARGET else 1


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


if __name__ == "__main__":
    raise SystemExit(main())
