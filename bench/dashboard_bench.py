"""Dashboards at chain scale: 200 stores × 90 days on TimescaleDB, page latencies p50 / p95.

    .venv/bin/python -m bench.dashboard_bench                      # 200 stores × 90 days (~30 M sale lines)
    .venv/bin/python -m bench.dashboard_bench --stores 20 --days 30 --requests 20   # a quick look

A scratch TimescaleDB database gets the history in bulk, generated inside PostgreSQL with
`generate_series` (no Python per row): per store and day ~500 receipts of 3–4 lines, one
consultation of five steps (symptoms, an insurance check) for every tenth receipt, and 56
footfall quarter-hours. `storepulse rollups rebuild` then fills the rollups, day by day, the
way the scheduler keeps them. The real `storepulse serve` runs in its own process; the bench
signs in as headquarters and as a store manager and requests each page N times in turn:
the chain view (last 30 and 90 days), the morning report (page and XLSX), a store view.
Targets: chain view and morning report p95 < 1 s, store view p95 < 300 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import text

from bench.common import (
    exit_cleanly_on_sigterm,
    free_port,
    machine_facts,
    percentile,
    print_facts,
    print_table,
    scratch_timescale,
    sign_in,
)
from bench.pos_bench import server
from ingest.db import get_engine, session_scope
from ingest.users import create_user, set_password
from store_rules import rollups
from store_rules.definitions import load_config_dir

PASSWORD = "bench password 1"
TZ = ZoneInfo("Asia/Shanghai")
TARGETS_MS = {
    "chain view (30 days)": 1000.0, "chain view (90 days)": 1000.0, "morning report": 1000.0,
    "morning report XLSX": 1000.0, "store view": 300.0,
}  # fmt: skip

MASTER_SQL = """
INSERT INTO regions (region_id, name_zh, name_en)
SELECT 'R' || lpad(r::text, 2, '0'), '区域' || r, 'Region ' || r FROM generate_series(1, 10) r;
INSERT INTO stores (store_id, region_id, name_zh, name_en, city, timezone, active)
SELECT 'B' || lpad(s::text, 4, '0'), 'R' || lpad((1 + (s - 1) % 10)::text, 2, '0'), '门店' || s, 'Store ' || s,
       NULL, 'Asia/Shanghai', true
FROM generate_series(1, :stores) s;
INSERT INTO terminals (store_id, terminal_id, name)
SELECT store_id, 'T' || t, 'till ' || t FROM stores, generate_series(1, 3) t WHERE store_id LIKE 'B%';
INSERT INTO staff (staff_id, store_id, name, role)
SELECT store_id || '-E' || e, store_id, '店员' || e, CASE WHEN e = 1 THEN 'pharmacist' ELSE 'cashier' END
FROM stores, generate_series(1, 4) e WHERE store_id LIKE 'B%';
INSERT INTO skus (sku, name_zh, name_en, category, unit_price, is_rx, flow_controlled, prompt_triggering,
                  insurance_eligible)
SELECT '69' || lpad(k::text, 11, '0'), '商品' || k, 'SKU ' || k, 'cat' || (k % 8), 5 + (k % 40),
       k % 10 = 0, k % 10 = 0, k = 10, k % 3 = 0
FROM generate_series(1, 400) k;
"""

# Receipts: :per_day a store-day, 08:00–22:00 local; lines: 3 or 4 per receipt.
RECEIPTS_SQL = """
INSERT INTO receipts (event_id, occurred_at, store_id, terminal_id, receipt_id, kind, staff_id, member_id,
                      consultation_id, total, line_count, received_at, raw)
SELECT 'B-' || st.store_id || '-' || d || '-' || r,
       (CAST(:first AS date) + d) + time '08:00' - interval '8 hours'
         + (r * (14 * 3600.0 / :per_day)) * interval '1 second',
       st.store_id, 'T' || (1 + r % 3), to_char(CAST(:first AS date) + d, 'YYYYMMDD') || '-' || r, 'sale',
       st.store_id || '-E' || (1 + r % 4), NULL,
       CASE WHEN r % 10 = 0 THEN 'C-' || st.store_id || '-' || d || '-' || r END,
       (3 + r % 2) * 12.50, 3 + r % 2, now(), '{}'::jsonb
FROM stores st, generate_series(0, :days - 1) d, generate_series(1, :per_day) r
WHERE st.store_id LIKE 'B%'
"""
LINES_SQL = """
INSERT INTO receipt_lines (event_id, line_no, occurred_at, store_id, receipt_id, kind, sku, qty, unit_price, amount,
                           promotion_id)
SELECT r.event_id, l, r.occurred_at, r.store_id, r.receipt_id, 'sale',
       '69' || lpad((1 + (abs(hashtext(r.event_id)::bigint) + l * 37) % 400)::text, 11, '0'), 1, 12.50, 12.50, NULL
FROM receipts r, generate_series(1, 4) l
WHERE l <= r.line_count AND r.occurred_at >= :start AND r.occurred_at < :end
"""
STEPS_SQL = """
INSERT INTO consultation_steps (event_id, occurred_at, store_id, terminal_id, consultation_id, staff_id, member_id,
                                customer_name, step, status, skip_reason, data, received_at, raw)
SELECT r.consultation_id || '-' || s.step, r.occurred_at - (6 - s.n) * interval '1 minute', r.store_id,
       r.terminal_id, r.consultation_id, r.staff_id, NULL, NULL, s.step,
       CASE WHEN s.step = 'symptoms' AND abs(hashtext(r.event_id)::bigint) % 7 = 0 THEN 'skipped' ELSE 'done' END,
       CASE WHEN s.step = 'symptoms' AND abs(hashtext(r.event_id)::bigint) % 7 = 0 THEN 'customer_refused' END,
       CASE s.step
         WHEN 'symptoms' THEN '{"text": "胸闷", "keywords": ["胸闷"]}'::jsonb
         WHEN 'recommendation' THEN '{"skus": ["6900000000010"]}'::jsonb
         WHEN 'insurance_check' THEN CASE WHEN abs(hashtext(r.event_id)::bigint) % 4 = 0
              THEN '{"result": "fail", "reason": "卡过期"}'::jsonb ELSE '{"result": "pass"}'::jsonb END
         WHEN 'guidance' THEN '{"text": "饭后服用"}'::jsonb
         ELSE '{}'::jsonb END,
       now(), '{}'::jsonb
FROM receipts r,
     (VALUES (1, 'consultation'), (2, 'symptoms'), (3, 'recommendation'), (4, 'insurance_check'), (5, 'guidance'))
       AS s(n, step)
WHERE r.consultation_id IS NOT NULL AND r.occurred_at >= :start AND r.occurred_at < :end
"""
FOOTFALL_SQL = """
INSERT INTO footfall (event_id, occurred_at, store_id, sensor_id, period_seconds, count_in, count_out, received_at,
                      raw)
SELECT 'F-' || st.store_id || '-' || d || '-' || q,
       (CAST(:first AS date) + d) + time '08:00' - interval '8 hours' + q * interval '15 minutes',
       st.store_id, 'door-1', 900, 20 + (q % 7) * 3, 20 + (q % 7) * 3, now(), '{}'::jsonb
FROM stores st, generate_series(0, :days - 1) d, generate_series(0, 55) q
WHERE st.store_id LIKE 'B%'
"""


def generate(url: str, stores: int, days: int, per_day: int) -> dict[str, float]:
    """The history, in bulk inside PostgreSQL; returns seconds per phase."""
    engine = get_engine(url)
    last = datetime.now(TZ).date() - timedelta(days=1)
    first = last - timedelta(days=days - 1)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in MASTER_SQL.split(";"):
            if statement.strip():
                conn.execute(text(statement), {"stores": stores})
    with session_scope(engine) as session:
        load_config_dir(session=session)
    timings["master data"] = time.perf_counter() - started
    params = {"first": first.isoformat(), "days": days, "per_day": per_day}
    for name, sql in (("receipts", RECEIPTS_SQL), ("footfall", FOOTFALL_SQL)):
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text(sql), params)
        timings[name] = time.perf_counter() - started
    # Lines and steps a week at a time: smaller transactions, the same chunks hot.
    for name, sql in (("receipt lines", LINES_SQL), ("consultation steps", STEPS_SQL)):
        started = time.perf_counter()
        day = first
        while day <= last:
            end = min(day + timedelta(days=7), last + timedelta(days=1))
            window = {"start": datetime.combine(day, datetime.min.time(), TZ).astimezone(UTC),
                      "end": datetime.combine(end, datetime.min.time(), TZ).astimezone(UTC)}  # fmt: skip
            with engine.begin() as conn:
                conn.execute(text(sql), window)
            day = end
        timings[name] = time.perf_counter() - started
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    timings["analyze"] = time.perf_counter() - started
    started = time.perf_counter()
    day = first
    while day <= last:
        with session_scope(engine) as session:
            rollups.rebuild(session=session, first=day, last=day)
        day += timedelta(days=1)
    timings["rollups rebuild"] = time.perf_counter() - started
    with session_scope(engine) as session:
        create_user(session=session, user_id="hq", name="总部", role="headquarters")
        set_password(session=session, user_id="hq", password=PASSWORD)
        create_user(session=session, user_id="mgr", name="店长", role="manager", store_id="B0001")
        set_password(session=session, user_id="mgr", password=PASSWORD)
    return timings


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    url = stack.enter_context(scratch_timescale())
    engine = get_engine(url)
    print_facts(machine_facts(engine))
    timings = generate(url, args.stores, args.days, args.per_day)
    with engine.connect() as conn:
        tables = ("receipts", "receipt_lines", "consultation_steps", "footfall", "rollup_store_day")
        counts = {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables}
    print(f"database {url.rsplit('/', 1)[-1]}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
    print("generation: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storepulse-dash-bench-")))
    port = free_port()
    api = stack.enter_context(server(url, port, workdir / "server.log"))
    base = f"http://127.0.0.1:{port}"
    hq, manager = sign_in(base, "hq", PASSWORD), sign_in(base, "mgr", PASSWORD)
    stack.callback(hq.close)
    stack.callback(manager.close)
    pages = {
        "chain view (30 days)": (hq, "/?days=30"),
        "chain view (90 days)": (hq, "/?days=90"),
        "morning report": (hq, "/reports/morning"),
        "morning report XLSX": (hq, "/reports/morning.xlsx"),
        "store view": (manager, "/stores/B0001"),
    }
    for client, path in pages.values():  # warm-up: connections, template compilation, caches
        assert client.get(path).status_code == 200, path
    latencies: dict[str, list[float]] = {name: [] for name in pages}
    for _ in range(args.requests):
        for name, (client, path) in pages.items():
            started = time.perf_counter()
            response = client.get(path)
            latencies[name].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (path, response.status_code)
    rows, verdicts = [], []
    for name, values in latencies.items():
        ordered = sorted(values)
        p95 = percentile(ordered, 95)
        ok = p95 < TARGETS_MS[name]
        verdicts.append(ok)
        rows.append([name, f"{statistics.median(ordered):.0f}", f"{p95:.0f}", f"{max(ordered):.0f}",
                     f"< {TARGETS_MS[name]:.0f}", "PASS" if ok else "FAIL"])  # fmt: skip
    print()
    print_table(
        f"{args.requests} requests per page, server pid {api.pid} (ms)",
        ["page", "p50", "p95", "max", "target p95", "verdict"],
        rows,
    )
    return 0 if all(verdicts) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--per-day", type=int, default=500, help="receipts per store and day (3.5 lines each)")
    parser.add_argument("--requests", type=int, default=40, help="requests per page")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    os.environ.setdefault("STOREPULSE_ENV", "test")
    with ExitStack() as stack:
        return run(args, stack)


if __name__ == "__main__":
    raise SystemExit(main())
