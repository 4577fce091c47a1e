"""Validation throughput: `parse_event` with its fast path against the pydantic models alone, same run.

    .venv/bin/python -m bench.parse_bench              # ~40 s; target ≥ 200,000 sale lines/s
    .venv/bin/python -m bench.parse_bench --rounds 5 --receipts 50000

Each round parses N fresh 4-line sale receipts (the writer benchmark's payloads) the way the
ingest worker does: in batches of the worker's size, each batch's events kept in a list until the
batch is done. Both paths run in every round, in alternating order:

- fast: `parse_event` as shipped (ingest/fast_contract.py first, the models on any doubt);
- models: `parse_event` inside `models_only()`, i.e. what every payload cost before.

Memory management matters as much as the code, so every measure runs under two garbage-collector
settings and says which:

- worker GC: what the ingest worker and the importer run with (ingest/gc_tuning.py): objects alive
  at start frozen out of the collector (here the payload corpus, as the worker's start-up objects)
  and the gen-0 threshold raised to 50,000 while batches are handled. The target is judged here.
- Python defaults: thresholds (700, 10, 10), nothing frozen.

`--gc worker` or `--gc defaults` runs only one of them. The real NCR POSLog receipts (adapter
output: 13 lines on average, with descriptions and source ids) are parsed as a second corpus. A
raw binary COPY of the same receipts' rows into a scratch TimescaleDB runs in the same process for scale
(`--no-copy` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    LINES_PER_RECEIPT,
    batched,
    bench_receipt,
    exit_cleanly_on_sigterm,
    machine_facts,
    print_facts,
    print_table,
    scratch_timescale,
)
from ingest.contract import Event, parse_event
from ingest.db import get_engine, session_scope
from ingest.fast_contract import models_only
from ingest.gc_tuning import BATCH_GEN0_THRESHOLD, batch_gc_thresholds
from ingest.writers.base import flatten
from ingest.writers.postgres import copy_rows_raw

TARGET = 200_000
NCR_POSLOG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "poslog" / "ncr_acs" / "POSLog.xml"


def load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def parse_batches(raws: Sequence[dict[str, Any]], batch: int) -> float:
    """Seconds to parse every payload, batch by batch, each batch's events alive until it is done."""
    started = time.perf_counter()
    for chunk in batched(raws, batch):
        events = [parse_event(raw) for raw in chunk]
        del events
    return time.perf_counter() - started


def ncr_receipts(copies: int) -> list[dict[str, Any]]:
    """The NCR ACS sample's receipts through the POSLog adapter, repeated with distinct event ids."""
    import adapters.sources.poslog  # noqa: F401  (registers the adapter)
    from adapters.sources.base import AdapterContext, get_adapter

    path = NCR_POSLOG.resolve()
    if not path.exists():
        return []
    events = get_adapter("poslog").convert(path, context=AdapterContext(mappings={"store": {"9": "S001"}})).events
    receipts = [event for event in events if event["type"] == "receipt"]
    return [{**event, "event_id": f"{event['event_id']}#{n}"} for n in range(copies) for event in receipts]


GC_SETTINGS = {
    "worker": f"worker GC: corpus frozen, gen-0 threshold {BATCH_GEN0_THRESHOLD:,}",
    "defaults": "Python's default GC: thresholds (700, 10, 10), nothing frozen",
}


def timed_rounds(
    label: str, raws: list[dict[str, Any]], lines: int, rounds: int, batch: int, gc_setting: str
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"fast": [], "models": []}
    worker_gc = gc_setting == "worker"
    label = f"{label}, {gc_setting} GC"
    if worker_gc:
        gc.collect()
        gc.freeze()
    thresholds = batch_gc_thresholds() if worker_gc else contextlib.nullcontext()
    try:
        with thresholds:
            for round_no in range(rounds):
                order = ["fast", "models"] if round_no % 2 == 0 else ["models", "fast"]
                for name in order:
                    context = models_only() if name == "models" else contextlib.nullcontext()
                    with context:
                        gc.collect()
                        seconds = parse_batches(raws, batch)
                    rates[name].append(lines / seconds)
                print(
                    f"{label} round {round_no + 1} ({' → '.join(order)}): fast {rates['fast'][-1]:,.0f} lines/s, "
                    f"models {rates['models'][-1]:,.0f} lines/s, load {load()}",
                    flush=True,
                )
    finally:
        if worker_gc:
            gc.unfreeze()
    return rates


def raw_copy_rate(raws: list[dict[str, Any]], batch: int) -> float:
    """Lines/s of a plain binary COPY of these receipts' rows (flattened before the clock starts)."""
    with scratch_timescale() as url:
        engine = get_engine(url)
        received_at = datetime.now(UTC)
        prepared = []
        for chunk in batched(raws, batch):
            events: list[Event] = [parse_event(raw) for raw in chunk]
            rows = flatten(events, chunk, received_at)
            prepared.append((rows.headers["receipts"], rows.children["receipt_lines"]))
        lines = sum(len(lines) for _, lines in prepared)
        started = time.perf_counter()
        for headers, line_rows in prepared:
            with session_scope(engine) as session:
                copy_rows_raw(session, "receipts", headers)
                copy_rows_raw(session, "receipt_lines", line_rows)
        seconds = time.perf_counter() - started
        engine.dispose()
    return lines / seconds


def row(label: str, rates: list[float]) -> list[str]:
    return [label, f"{max(rates):,.0f}", f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=25_000, help="4-line receipts per round")
    parser.add_argument("--batch", type=int, default=2_000, help="events per batch (the worker's batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--gc", choices=["both", "worker", "defaults"], default="both", help="garbage-collector settings to run under"
    )
    parser.add_argument("--no-copy", action="store_true", help="skip the raw COPY baseline (no database needed)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()

    print_facts(machine_facts())
    settings = ["worker", "defaults"] if args.gc == "both" else [args.gc]
    print(f"load before: {load()}; GC settings: " + "; ".join(GC_SETTINGS[name] for name in settings))
    raws = [bench_receipt(n, "p") for n in range(args.receipts)]
    lines = args.receipts * LINES_PER_RECEIPT
    synthetic = {name: timed_rounds("4-line receipts", raws, lines, args.rounds, args.batch, name) for name in settings}

    ncr = ncr_receipts(max(1, lines // 544))
    ncr_rates: dict[str, dict[str, list[float]]] = {}
    if ncr:
        ncr_lines = sum(len(event["lines"]) for event in ncr)
        ncr_rates = {
            name: timed_rounds("NCR POSLog receipts", ncr, ncr_lines, args.rounds, args.batch, name)
            for name in settings
        }
    del ncr

    copy_rate = None if args.no_copy else raw_copy_rate(raws[: min(len(raws), 25_000)], args.batch)

    rows = []
    for name in settings:
        rows.append(row(f"parse_event, fast path (4-line receipts), {name} GC", synthetic[name]["fast"]))
        rows.append(row(f"parse_event, models only (4-line receipts), {name} GC", synthetic[name]["models"]))
    for name, rates in ncr_rates.items():
        rows.append(row(f"parse_event, fast path (NCR POSLog receipts), {name} GC", rates["fast"]))
        rows.append(row(f"parse_event, models only (NCR POSLog receipts), {name} GC", rates["models"]))
    if copy_rate is not None:
        rows.append(["raw binary COPY of the 4-line receipts' rows, TimescaleDB", f"{copy_rate:,.0f}", "-", "-"])
    print_table(
        f"sale lines/s ({args.rounds} rounds, batches of {args.batch:,}); "
        + "; ".join(f"{name} = {GC_SETTINGS[name]}" for name in settings),
        ["measure", "best", "median", "worst"],
        rows,
    )
    judged = settings[0]
    median_fast = statistics.median(synthetic[judged]["fast"])
    speedup = median_fast / statistics.median(synthetic[judged]["models"])
    checks = [
        [
            f"parse_event ≥ 200,000 lines/s (median round, {judged} GC)",
            f"{median_fast:,.0f}",
            verdict(median_fast >= TARGET),
        ],
        [f"fast path ≥ 4 × the models (median rounds, {judged} GC)", f"{speedup:.1f} ×", verdict(speedup >= 4)],
    ]
    print_table(f"acceptance (load at the end: {load()})", ["target", "measured", "verdict"], checks)
    return 0 if median_fast >= TARGET else 1


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


if __name__ == "__main__":
    raise SystemExit(main())
