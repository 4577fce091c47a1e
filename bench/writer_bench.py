"""Writer throughput: the PostgreSQL COPY writer against a plain binary COPY of the same rows.

    .venv/bin/python -m bench.writer_bench            # TimescaleDB (scratch database)
    .venv/bin/python -m bench.writer_bench --sqlite   # the embedded SQLite default, for information

Each round stores N fresh receipts (4 lines each) in batches of the worker's size, every batch
in its own `session_scope` (commit included), and measures:

- writer: `get_writer(dialect).write(events, raws)` of pre-validated events;
- raw COPY (TimescaleDB only): `copy_rows_raw` of the very rows the writer stores (receipt
  headers and lines, flattened beforehand, fresh keys) straight into the hypertables, with no
  staging table and no idempotency: the ceiling the writer is compared with;
- validated: `parse_event` of the decoded JSON payloads plus the writer, i.e. what a worker
  spends per batch apart from MQTT and JSON decoding.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, text

from bench.common import (
    LINES_PER_RECEIPT,
    batched,
    bench_receipt,
    exit_cleanly_on_sigterm,
    load_small_chain,
    machine_facts,
    print_facts,
    print_table,
    scratch_timescale,
    timed_raw_copy,
)
from ingest.contract import Event, parse_event
from ingest.db import get_engine, session_scope
from ingest.writers import get_writer

WRITER_TARGET = 50_000
RATIO_TARGET = 0.6


def payloads(prefix: str, count: int) -> list[dict[str, Any]]:
    return [bench_receipt(n, prefix) for n in range(count)]


def validate(raws: Sequence[dict[str, Any]]) -> tuple[list[Event], float]:
    started = time.perf_counter()
    events = [parse_event(raw) for raw in raws]
    return events, time.perf_counter() - started


def run_writer(engine: Engine, events: list[Event], raws: list[dict[str, Any]], batch: int) -> float:
    writer = get_writer(engine.dialect.name)
    pairs = list(zip(batched(events, batch), batched(raws, batch), strict=True))
    accepted = 0
    started = time.perf_counter()
    for batch_events, batch_raws in pairs:
        with session_scope(engine) as session:
            statuses = writer.write(batch_events, batch_raws, session=session)
        accepted += statuses.count("accepted")
    elapsed = time.perf_counter() - started
    if accepted != len(events):
        raise RuntimeError(f"writer accepted {accepted} of {len(events)} fresh events")
    return elapsed


def run_validated(engine: Engine, raws: list[dict[str, Any]], batch: int) -> float:
    writer = get_writer(engine.dialect.name)
    accepted = 0
    started = time.perf_counter()
    for batch_raws in batched(raws, batch):
        events = [parse_event(raw) for raw in batch_raws]
        with session_scope(engine) as session:
            statuses = writer.write(events, batch_raws, session=session)
        accepted += statuses.count("accepted")
    elapsed = time.perf_counter() - started
    if accepted != len(raws):
        raise RuntimeError(f"writer accepted {accepted} of {len(raws)} fresh events")
    return elapsed


def profiled(label: str, enabled: bool, run: Callable[[], float]) -> float:
    if not enabled:
        return run()
    profile = cProfile.Profile()
    elapsed = profile.runcall(run)
    print(f"\n--- cProfile of one {label} round (cumulative, top 30) ---")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    return elapsed


def summary(label: str, lines: int, timings: list[Timing]) -> list[Any]:
    rates = [lines / t.wall for t in timings]
    per = 100_000 / lines
    client = statistics.median(t.client_cpu for t in timings) * per
    server = statistics.median(t.server_cpu for t in timings) * per
    return [
        label,
        f"{max(rates):,.0f}",
        f"{statistics.median(rates):,.0f}",
        f"{min(rates):,.0f}",
        f"{client:.2f} s",
        f"{server:.2f} s" if server else "-",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=25_000, help="receipts per round (4 lines each)")
    parser.add_argument("--batch", type=int, default=2_000, help="events per batch (the worker's batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sqlite", action="store_true", help="bench the SQLite writer instead (no raw baseline)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first writer and validated rounds")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()

    if args.sqlite:
        with tempfile.TemporaryDirectory(prefix="storepulse-bench-") as tmp:
            from ingest.migrate import upgrade

            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            upgrade(url)
            engine = get_engine(url)
            load_small_chain(engine)
            try:
                return bench(engine, args)
            finally:
                engine.dispose()
    with scratch_timescale() as url:
        return bench(get_engine(url), args)


@dataclass
class Timing:
    """Wall seconds of one round, with the CPU seconds of this process and of its database backend."""

    wall: float
    client_cpu: float
    server_cpu: float


def measured(engine: Engine, run: Callable[[], float]) -> Timing:
    backend = backend_process(engine)
    client_before = time.process_time()
    server_before = cpu_of(backend)
    wall = run()
    return Timing(wall, time.process_time() - client_before, cpu_of(backend) - server_before)


def backend_process(engine: Engine) -> psutil.Process | None:
    """The server process behind the pooled connection the rounds use (one thread: always the same one)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def cpu_of(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def bench(engine: Engine, args: argparse.Namespace) -> int:
    postgres = engine.dialect.name == "postgresql"
    lines = args.receipts * LINES_PER_RECEIPT
    print_facts(machine_facts(engine))
    print(
        f"{engine.dialect.name}: {args.rounds} rounds of {args.receipts:,} receipts = {lines:,} sale lines, "
        f"batches of {args.batch:,} events, one transaction per batch"
    )
    timings: dict[str, list[Timing]] = {"writer": [], "raw": [], "validated": []}
    parse_s: list[float] = []
    for round_no in range(args.rounds):
        first = args.profile and round_no == 0
        raws = payloads(f"w{round_no}", args.receipts)
        events, parse_seconds = validate(raws)
        parse_s.append(parse_seconds)
        runs: dict[str, Callable[[], float]] = {
            "writer": partial(profiled, "writer", first, partial(run_writer, engine, events, raws, args.batch))
        }
        if postgres:
            raw_raws = payloads(f"c{round_no}", args.receipts)
            raw_events, _ = validate(raw_raws)
            runs["raw"] = partial(timed_raw_copy, engine, raw_events, raw_raws, args.batch)
        val_raws = payloads(f"v{round_no}", args.receipts)
        runs["validated"] = partial(profiled, "validated", first, partial(run_validated, engine, val_raws, args.batch))
        # Rotate the order so that no measure always runs on the larger tables or right after a checkpoint.
        order = list(runs)
        order = order[round_no % len(order) :] + order[: round_no % len(order)]
        for name in order:
            timings[name].append(measured(engine, runs[name]))
        writer = timings["writer"][-1].wall
        line = f"round {round_no + 1} ({' → '.join(order)}): writer {lines / writer:,.0f} lines/s"
        if postgres:
            raw = timings["raw"][-1].wall
            line += f", raw COPY {lines / raw:,.0f} lines/s (ratio {raw / writer:.2f})"
        line += (
            f", validation {lines / parse_seconds:,.0f}, validated+write {lines / timings['validated'][-1].wall:,.0f}"
        )
        print(line, flush=True)

    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM receipt_lines")).scalar_one()
    expected = lines * args.rounds * (3 if postgres else 2)
    if stored != expected:
        raise RuntimeError(f"receipt_lines holds {stored} rows, expected {expected}")

    labels = {
        "writer": "writer.write + commit (pre-validated)",
        "raw": "raw binary COPY, same rows, no idempotency",
        "validated": "parse_event + writer.write + commit",
    }
    rows = []
    for name, label in labels.items():
        if timings[name]:
            rows.append(summary(label, lines, timings[name]))
    rows.insert(-1, summary("parse_event only (validation)", lines, [Timing(s, s, 0.0) for s in parse_s]))
    print_table(
        f"{engine.dialect.name} writer, sale lines/s ({args.rounds} rounds of {lines:,} lines; CPU = seconds "
        f"per 100k lines of this process{' / of its PostgreSQL backend' if postgres else ''}, median)",
        ["measure", "best", "median", "worst", "client CPU", "server CPU"],
        rows,
    )
    if not postgres:
        return 0
    writer_s = [t.wall for t in timings["writer"]]
    raw_s = [t.wall for t in timings["raw"]]
    ratios = sorted(r / w for w, r in zip(writer_s, raw_s, strict=True))
    best_writer = lines / min(writer_s)
    median_writer = lines / statistics.median(writer_s)
    ratio_best = min(raw_s) / min(writer_s)
    checks = [
        ["writer ≥ 50,000 lines/s (median round)", f"{median_writer:,.0f}", verdict(median_writer >= WRITER_TARGET)],
        ["writer ≥ 50,000 lines/s (best round)", f"{best_writer:,.0f}", verdict(best_writer >= WRITER_TARGET)],
        ["writer / raw COPY ≥ 0.6 (median of rounds)", f"{statistics.median(ratios):.2f}",
         verdict(statistics.median(ratios) >= RATIO_TARGET)],
        ["writer / raw COPY ≥ 0.6 (best vs best)", f"{ratio_best:.2f}", verdict(ratio_best >= RATIO_TARGET)],
    ]  # fmt: skip
    print_table("acceptance", ["target", "measured", "verdict"], checks)
    return 0 if median_writer >= WRITER_TARGET and statistics.median(ratios) >= RATIO_TARGET else 1


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


if __name__ == "__main__":
    raise SystemExit(main())
