"""Helpers shared by the benchmarks: scratch databases, event builders, machine facts, tables."""

from __future__ import annotations

import collections
import importlib
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Engine, text

from ingest.contract import Event
from ingest.db import session_scope
from ingest.writers.base import flatten
from ingest.writers.postgres import copy_rows_raw

# The test fixtures are reused as they are; imported dynamically so that `mypy bench` checks the
# benchmarks without type-checking the test suite as well.
_conftest: Any = importlib.import_module("tests.conftest")
_factories: Any = importlib.import_module("tests.factories")

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = os.environ.get("STOREPULSE_BENCH_MOSQUITTO", "/usr/sbin/mosquitto")
STORES = ("S001", "S002", "S003")
LINES_PER_RECEIPT = 4


def _raise_on_term(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks drop scratch databases and stop brokers."""
    signal.signal(signal.SIGTERM, _raise_on_term)


def load_small_chain(engine: Engine) -> None:
    _conftest.load_small_chain(engine)


def sign_in(base_url: str, user_id: str, password: str) -> Any:
    """An httpx.Client signed in through the real login form (the test suite's helper)."""
    return _conftest.sign_in(base_url, user_id, password, timeout=120)


def free_port() -> int:
    return int(_conftest.free_port())


@contextmanager
def scratch_timescale() -> Iterator[str]:
    """A migrated TimescaleDB database with the small chain, dropped on the way out, even on failure."""
    try:
        url = str(_conftest.create_timescale_database("storepulse_bench"))
    except _conftest.pytest.skip.Exception as exc:  # the fixture "skips" when PostgreSQL/TimescaleDB is missing
        raise SystemExit(f"cannot benchmark: {exc}") from None
    try:
        from ingest.db import get_engine

        load_small_chain(get_engine(url))
        yield url
    finally:
        _conftest.drop_database(url)


def bench_receipt(
    n: int, prefix: str, *, store_id: str | None = None, at: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    """Receipt number ``n`` of a run: a 4-line sale, stores rotating over the small chain.

    Event ids are ``<prefix>-<n, 9 digits>`` so that they sort in publishing order.
    """
    store_id = store_id or STORES[n % len(STORES)]
    event: dict[str, Any] = _factories.receipt(
        n, store_id=store_id, lines=LINES_PER_RECEIPT, at=at, event_id=f"{prefix}-{n:09d}", **extra
    )
    return event


def batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def timed_raw_copy(engine: Engine, events: Sequence[Event], raws: Sequence[dict[str, Any]], batch: int) -> float:
    """Seconds of a plain binary COPY of the writer's receipt rows (no staging, no idempotency): the ceiling.

    Flattening happens before the clock starts.
    """
    received_at = datetime.now(UTC)
    prepared = []
    for batch_events, batch_raws in zip(batched(events, batch), batched(raws, batch), strict=True):
        rows = flatten(batch_events, batch_raws, received_at)
        prepared.append((rows.headers.get("receipts", []), rows.children.get("receipt_lines", [])))
    started = time.perf_counter()
    for headers, lines in prepared:
        with session_scope(engine) as session:
            copy_rows_raw(session, "receipts", headers)
            copy_rows_raw(session, "receipt_lines", lines)
    return time.perf_counter() - started


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def machine_facts(engine: Engine | None = None) -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    facts = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": _first_line([MOSQUITTO, "-h"]).removeprefix("mosquitto "),
    }
    if engine is not None and engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            facts["postgresql"] = str(conn.execute(text("SHOW server_version")).scalar())
            facts["timescaledb"] = str(
                conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
            )
            facts["synchronous_commit"] = str(conn.execute(text("SHOW synchronous_commit")).scalar())
    return facts


def print_facts(facts: dict[str, str]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            + " |"
        )

    print()
    print(title)
    print(fmt(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(fmt(row))
    sys.stdout.flush()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def summarise_profile(path: Path, title: str, top: int = 18) -> str:
    """Own and inclusive time per frame of a py-spy raw (collapsed stacks) file."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split("/")[-1] if " (" in f else f for f in stack.split(";")
        ]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{title}: {total} samples ({path})", "  own time:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(lines)


@contextmanager
def py_spy_recording(
    pid: int, raw: Path, title: str, *, extra_args: Sequence[str] = (), top: int = 18
) -> Iterator[None]:
    """Record `pid` with py-spy while the block runs, then print where its time went."""
    spy = shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy")
    raw.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw), *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if raw.exists():
        print(summarise_profile(raw, title, top))
