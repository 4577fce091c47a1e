"""MQTT end to end: publisher → Mosquitto → `storepulse ingest-worker` → TimescaleDB.

    .venv/bin/python -m bench.mqtt_bench              # throughput (batched and single-event messages) + RSS
    .venv/bin/python -m bench.mqtt_bench --latency    # publish → committed latency at a paced 2,000 events/s
    .venv/bin/python -m bench.mqtt_bench --all        # both, one broker, one database, one worker

Everything runs on this machine and is torn down at the end, also on failure or SIGTERM:
its own Mosquitto on a free port (the repo's infra/mosquitto/tuning.conf, persistence in a
temporary directory), a scratch TimescaleDB database with the small chain, the real worker as
a subprocess (so its memory is its own), and a publisher in a separate process (paho-mqtt 2,
MQTT v5, QoS 1, payloads serialised before the clock starts).

Throughput = sale lines ÷ (first publish → the poll, every 100 ms, that finds every receipt
committed). Latency = first time an event is visible in the database (poll every 20 ms,
visible = committed) − the wall-clock time the publisher put into its ``sent_at`` field.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import orjson
import psutil
from sqlalchemy import Engine, text

from bench.common import (
    LINES_PER_RECEIPT,
    MOSQUITTO,
    ROOT,
    STORES,
    bench_receipt,
    exit_cleanly_on_sigterm,
    free_port,
    machine_facts,
    percentile,
    print_facts,
    print_table,
    py_spy_recording,
    scratch_timescale,
)
from ingest.db import get_engine

TOPIC_PREFIX = "storepulse/bench"
THROUGHPUT_TARGET = 20_000
RSS_TARGET_MB = 300
P99_TARGET_MS = 1_000
PERSISTENCE_KEYS = ("persistence", "autosave_interval", "persistence_location", "persistent_client_expiration")


# --- broker ---------------------------------------------------------------------------------


def broker_config(port: int, data_dir: Path, persistence: bool) -> str:
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr", "log_type error"]
    lines.append("log_type warning")
    for raw in (ROOT / "infra" / "mosquitto" / "tuning.conf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not persistence and line.split()[0] in PERSISTENCE_KEYS:
            continue
        lines.append(line)
    if persistence:
        lines.append(f"persistence_location {data_dir}/")
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


@contextmanager
def mosquitto(workdir: Path, persistence: bool) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    data_dir = workdir / "broker-data"
    data_dir.mkdir()
    data_dir.chmod(0o777)  # run as root, Mosquitto drops to its own user before saving
    config = workdir / "mosquitto.conf"
    config.write_text(broker_config(port, data_dir, persistence))
    log = (workdir / "mosquitto.log").open("wb")
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(workdir / 'mosquitto.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not open its port within 10 s")
            time.sleep(0.05)
        yield process, port
    finally:
        stop_process(process, timeout=5)
        log.close()


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# --- worker ---------------------------------------------------------------------------------


class WorkerLog(threading.Thread):
    """Reads the worker's log; `subscribed` is set once it has subscribed to the event topics."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.stats: list[str] = []
        self.subscribed = threading.Event()

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.lines.append(line)
            if " ingest: " in line:
                self.stats.append(line.split(" ingest: ", 1)[1])
            if "subscribed to" in line:
                self.subscribed.set()

    def take_stats(self) -> list[str]:
        """The worker's own periodic stats lines since the last call."""
        taken, self.stats = self.stats, []
        return taken

    def tail(self, count: int = 30) -> str:
        return "\n".join(list(self.lines)[-count:])


@contextmanager
def ingest_worker(
    database_url: str, port: int, command: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], WorkerLog]]:
    env = {
        **os.environ,
        "STOREPULSE_DATABASE_URL": database_url,
        "STOREPULSE_MQTT_URL": f"mqtt://127.0.0.1:{port}",
        "STOREPULSE_MQTT_TOPIC_PREFIX": TOPIC_PREFIX,
        "STOREPULSE_MQTT_CLIENT_ID": f"storepulse-bench-{os.getpid()}",
    }
    command = command or [str(ROOT / ".venv" / "bin" / "storepulse"), "ingest-worker"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = WorkerLog(process.stdout)
    log.start()
    try:
        if not log.subscribed.wait(30):
            raise RuntimeError(f"the worker did not subscribe within 30 s:\n{log.tail()}")
        yield process, log
    finally:
        stop_process(process, timeout=15)
        log.join(2)


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its children, sampled every 100 ms."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.phase_peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                value = self.rss()
            except psutil.Error:
                return
            self.samples += 1
            self.peak = max(self.peak, value)
            self.phase_peak = max(self.phase_peak, value)
            self.stop.wait(self.every_s)

    def new_phase(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.phase_peak = self.rss()


# --- profiling the worker with py-spy (optional) ---------------------------------------------


@contextmanager
def py_spy(pid: int, out: Path | None, label: str) -> Iterator[None]:
    """Sample the worker with py-spy during a phase and print where its CPU time goes."""
    if out is None:
        yield
        return
    with py_spy_recording(
        pid,
        out / f"worker-{label}.txt",
        f"  py-spy, worker, {label}, busy threads",
        extra_args=("--rate", "200", "--nonblocking"),
    ):
        yield


# --- CPU accounting (who is busy on this 2-core machine) ------------------------------------


def cpu_seconds(pids: dict[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds so far of the named processes, of every PostgreSQL process and of the whole machine."""
    seconds: dict[str, dict[int, float]] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[name] = {pid: times.user + times.system}
    postgres: dict[int, float] = {}
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                postgres[process.pid] = times.user + times.system
    seconds["postgres (all processes)"] = postgres
    total = psutil.cpu_times()
    seconds["machine busy"] = {0: total.user + total.system + total.nice + total.irq + total.softirq}
    return seconds


def cpu_share(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], elapsed: float) -> str:
    """Share of one core per group over the phase (processes that ended during the phase are not counted)."""
    parts = []
    for name, now in after.items():
        then = before.get(name, {})
        used = sum(value - then.get(pid, 0.0) for pid, value in now.items())
        parts.append(f"{name} {100 * used / elapsed:.0f}%")
    return "CPU (100% = one core): " + ", ".join(parts)


# --- publisher (separate process) -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    port: int
    mode: str  # "batched", "single" or "paced"
    id_prefix: str
    receipts: int
    per_message: int = 1
    rate: float = 0.0
    window: int = 1000


def build_messages(plan: Plan) -> list[tuple[str, Any]]:
    """(topic, payload) pairs: bytes for the throughput modes, a dict to stamp for the paced mode."""
    messages: list[tuple[str, Any]] = []
    if plan.mode == "batched":
        for m, start in enumerate(range(0, plan.receipts, plan.per_message)):
            store = STORES[m % len(STORES)]
            events = [
                bench_receipt(n, plan.id_prefix, store_id=store)
                for n in range(start, min(plan.receipts, start + plan.per_message))
            ]
            messages.append((f"{TOPIC_PREFIX}/{store}/pos/T1/events", orjson.dumps({"events": events})))
        return messages
    for n in range(plan.receipts):
        event = bench_receipt(n, plan.id_prefix)
        topic = f"{TOPIC_PREFIX}/{event['store_id']}/pos/T1/events"
        messages.append((topic, event if plan.mode == "paced" else orjson.dumps(event)))
    return messages


def publisher_main(plan: Plan, conn: Connection) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    messages = build_messages(plan)
    acked = 0
    all_acked = threading.Event()
    # Our own window instead of paho's: paho rescans its whole in-flight list on every PUBACK.
    window = threading.Semaphore(plan.window)

    def on_publish(_client: Any, _userdata: Any, _mid: int, _reason: Any, _properties: Any) -> None:
        nonlocal acked
        acked += 1
        window.release()
        if acked == len(messages):
            all_acked.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", plan.port, keepalive=60)
    client.loop_start()
    conn.send(("ready", len(messages)))
    conn.recv()
    behind_max = 0.0
    first = time.monotonic()
    if plan.mode == "paced":
        for i, (topic, event) in enumerate(messages):
            due = first + i / plan.rate
            now = time.monotonic()
            while now < due:
                time.sleep(min(due - now, 0.001))
                now = time.monotonic()
            behind_max = max(behind_max, now - due)
            event["sent_at"] = time.time()
            window.acquire()
            client.publish(topic, orjson.dumps(event), qos=1)
    else:
        for topic, payload in messages:
            window.acquire()
            client.publish(topic, payload, qos=1)
    published = time.monotonic()
    all_acked.wait(120)
    conn.send(
        (
            "done",
            {
                "first": first,
                "published": published,
                "acked_at": time.monotonic(),
                "acked": acked,
                "messages": len(messages),
                "behind_max_ms": behind_max * 1000,
            },
        )
    )
    client.disconnect()
    client.loop_stop()


@contextmanager
def publisher(plan: Plan) -> Iterator[tuple[BaseProcess, Connection]]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=publisher_main, args=(plan, theirs), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 120
        while not ours.poll(0.5):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the publisher did not get ready (exit code {process.exitcode})")
        kind, _count = ours.recv()
        if kind != "ready":
            raise RuntimeError(f"the publisher said {kind!r} instead of 'ready'")
        yield process, ours
    finally:
        if process.is_alive():
            process.terminate()
        process.join(5)


def publisher_report(conn: Connection) -> dict[str, Any]:
    if not conn.poll(30):
        raise RuntimeError("the publisher did not report within 30 s of the end of the run")
    kind, info = conn.recv()
    if kind != "done" or info["acked"] != info["messages"]:
        raise RuntimeError(f"the publisher did not finish: {kind} {info}")
    return dict(info)


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Env:
    engine: Engine
    broker: subprocess.Popen[bytes]
    port: int
    worker: subprocess.Popen[bytes]
    worker_log: WorkerLog
    rss: RssSampler
    profile_dir: Path | None = None
    results: list[list[Any]] = field(default_factory=list)
    checks: list[tuple[str, str, bool | None]] = field(default_factory=list)

    def pids(self, publisher_pid: int | None) -> dict[str, int]:
        pids = {"worker": self.worker.pid, "mosquitto": self.broker.pid, "bench (poller)": os.getpid()}
        if publisher_pid:
            pids["publisher"] = publisher_pid
        return pids


def count_prefix(engine: Engine, prefix: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM receipts WHERE event_id > :low AND event_id < :high"),
                {"low": f"{prefix}-", "high": f"{prefix}."},
            ).scalar_one()
        )


def throughput(env: Env, mode: str, receipts: int, per_message: int, timeout_s: float) -> float:
    prefix = f"tp{mode[0]}"
    plan = Plan(env.port, mode, prefix, receipts, per_message=per_message, window=200 if mode == "batched" else 2000)
    lines = receipts * LINES_PER_RECEIPT
    with publisher(plan) as (process, conn), py_spy(env.worker.pid, env.profile_dir, mode):
        env.rss.new_phase()
        pids = env.pids(process.pid)
        cpu_before = cpu_seconds(pids)
        conn.send("go")
        started = time.monotonic()
        stored = 0
        while True:
            time.sleep(0.1)
            stored = count_prefix(env.engine, prefix)
            done_at = time.monotonic()
            if stored >= receipts or done_at - started > timeout_s or env.worker.poll() is not None:
                break
        cpu_after = cpu_seconds(pids)
        info = publisher_report(conn)
    if stored < receipts:
        raise RuntimeError(
            f"{mode}: only {stored} of {receipts} receipts stored after {timeout_s:.0f} s\n{env.worker_log.tail()}"
        )
    elapsed = done_at - info["first"]
    rate = lines / elapsed
    publish_rate = lines / (info["acked_at"] - info["first"])
    print(
        f"{mode}: {lines:,} lines in {info['messages']:,} messages, stored in {elapsed:.2f} s = {rate:,.0f} lines/s "
        f"(publisher alone: {publish_rate:,.0f} lines/s); "
        f"worker peak RSS this phase {env.rss.phase_peak / 2**20:.0f} MB",
        flush=True,
    )
    print("  " + cpu_share(cpu_before, cpu_after, done_at - started), flush=True)
    for line in env.worker_log.take_stats():
        print(f"  worker log: {line}", flush=True)
    env.results.append(
        [
            f"throughput, {per_message} receipt(s) per message",
            f"{rate:,.0f} lines/s",
            f"{rate / LINES_PER_RECEIPT:,.0f} events/s",
            f"{info['messages']:,} msgs, {lines:,} lines, {elapsed:.1f} s",
        ]
    )
    return rate


def latency(env: Env, rate: float, seconds: float) -> dict[str, float]:
    receipts = int(rate * seconds)
    plan = Plan(env.port, "paced", "lat", receipts, rate=rate, window=1_000_000)
    seen: dict[str, tuple[float, float, float]] = {}  # event_id -> (sent_at, received_at, seen_at)
    query = text(
        "SELECT event_id, (raw->>'sent_at')::float8, extract(epoch FROM received_at)::float8 FROM receipts "
        "WHERE event_id > :low AND event_id < 'lat.'"
    )
    polls = 0
    with (
        publisher(plan) as (process, conn),
        py_spy(env.worker.pid, env.profile_dir, "latency"),
        env.engine.connect() as db,
    ):
        env.rss.new_phase()
        pids = env.pids(process.pid)
        cpu_before = cpu_seconds(pids)
        conn.send("go")
        started = time.monotonic()
        low_n = -1  # every event up to this number has been seen
        deadline = started + seconds + 30
        while len(seen) < receipts and time.monotonic() < deadline:
            # Visibility is taken when the query starts: its snapshot shows what had committed by then.
            poll_at = time.time()
            rows = db.execute(query, {"low": f"lat-{low_n:09d}" if low_n >= 0 else "lat-"}).all()
            db.commit()
            polls += 1
            for event_id, sent_at, received_at in rows:
                if event_id not in seen:
                    seen[event_id] = (sent_at, received_at, poll_at)
            while f"lat-{low_n + 1:09d}" in seen:
                low_n += 1
            time.sleep(max(0.0, 0.02 - (time.time() - poll_at)))
        elapsed = time.monotonic() - started
        cpu_after = cpu_seconds(pids)
        info = publisher_report(conn)
    if len(seen) < receipts:
        raise RuntimeError(f"latency: only {len(seen)} of {receipts} events committed\n{env.worker_log.tail()}")
    total_ms = sorted((s - sent) * 1000 for sent, _r, s in seen.values())
    to_worker_ms = sorted((r - sent) * 1000 for sent, r, _s in seen.values())
    achieved = receipts / (info["published"] - info["first"])
    result = {
        "p50": percentile(total_ms, 50),
        "p90": percentile(total_ms, 90),
        "p99": percentile(total_ms, 99),
        "max": total_ms[-1],
        "to_worker_p50": percentile(to_worker_ms, 50),
        "to_worker_p99": percentile(to_worker_ms, 99),
    }
    print(
        f"latency: {receipts:,} single-receipt messages paced at {rate:,.0f}/s (achieved {achieved:,.0f}/s, "
        f"publisher at most {info['behind_max_ms']:.1f} ms behind schedule), {polls:,} polls; "
        f"publish → committed p50 {result['p50']:.0f} ms, p90 {result['p90']:.0f} ms, p99 {result['p99']:.0f} ms, "
        f"max {result['max']:.0f} ms; publish → worker batch start p50 {result['to_worker_p50']:.0f} ms "
        f"p99 {result['to_worker_p99']:.0f} ms; worker peak RSS {env.rss.phase_peak / 2**20:.0f} MB",
        flush=True,
    )
    print("  " + cpu_share(cpu_before, cpu_after, elapsed), flush=True)
    for line in env.worker_log.take_stats():
        print(f"  worker log: {line}", flush=True)
    env.results.append(
        [
            f"latency at {rate:,.0f} events/s, publish → committed",
            f"p50 {result['p50']:.0f} / p99 {result['p99']:.0f} / max {result['max']:.0f} ms",
            f"{achieved:,.0f} events/s sent",
            f"{receipts:,} msgs over {seconds:.0f} s",
        ]
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", action="store_true", help="latency at a paced rate instead of throughput")
    parser.add_argument("--all", action="store_true", help="throughput and latency in one run")
    parser.add_argument("--lines", type=int, default=200_000, help="sale lines per throughput run")
    parser.add_argument("--per-message", type=int, default=50, help="receipts per batched message")
    parser.add_argument("--no-single", action="store_true", help="skip the single-event-message throughput run")
    parser.add_argument("--rate", type=float, default=2_000, help="events/s of the latency run")
    parser.add_argument("--seconds", type=float, default=20, help="duration of the latency run")
    parser.add_argument("--no-persistence", action="store_true", help="broker without persistence")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="profile the worker with py-spy into DIR")
    parser.add_argument(
        "--worker-command",
        help="run this instead of `storepulse ingest-worker` (e.g. an instrumented worker); same environment",
    )
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    run_throughput = args.all or not args.latency
    run_latency = args.all or args.latency
    receipts = args.lines // LINES_PER_RECEIPT

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storepulse-mqtt-bench-")))
        broker, port = stack.enter_context(mosquitto(workdir, persistence=not args.no_persistence))
        url = stack.enter_context(scratch_timescale())
        engine = get_engine(url)
        print_facts(machine_facts(engine))
        worker, worker_log = stack.enter_context(
            ingest_worker(url, port, args.worker_command.split() if args.worker_command else None)
        )
        rss = RssSampler(worker.pid)
        rss.start()
        stack.callback(rss.stop.set)
        time.sleep(0.5)
        idle_mb = rss.peak / 2**20
        env = Env(engine, broker, port, worker, worker_log, rss, profile_dir=args.py_spy)
        print(
            f"broker 127.0.0.1:{port} (persistence {'off' if args.no_persistence else 'on'}), "
            f"worker pid {worker.pid} idle RSS {idle_mb:.0f} MB",
            flush=True,
        )
        if run_throughput:
            batched_rate = throughput(env, "batched", receipts, args.per_message, timeout_s=150)
            env.checks.append(
                (
                    f"MQTT ≥ {THROUGHPUT_TARGET:,} lines/s ({args.per_message} receipts/msg)",
                    f"{batched_rate:,.0f}",
                    batched_rate >= THROUGHPUT_TARGET,
                )
            )
            if not args.no_single:
                single_rate = throughput(env, "single", receipts, 1, timeout_s=150)
                env.checks.append(("single-event messages (information)", f"{single_rate:,.0f}", None))
            peak_mb = rss.peak / 2**20
            env.checks.append((f"worker peak RSS < {RSS_TARGET_MB} MB", f"{peak_mb:.0f} MB", peak_mb < RSS_TARGET_MB))
        if run_latency:
            result = latency(env, args.rate, args.seconds)
            env.checks.append(
                (
                    f"p99 publish → committed < {P99_TARGET_MS} ms",
                    f"{result['p99']:.0f} ms",
                    result["p99"] < P99_TARGET_MS,
                )
            )
        stored_lines = 0
        with engine.connect() as conn:
            stored_lines = int(conn.execute(text("SELECT count(*) FROM receipt_lines")).scalar_one())
            dead = int(conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one())
        env.results.append(
            ["worker RSS", f"peak {rss.peak / 2**20:.0f} MB", f"idle {idle_mb:.0f} MB", f"{rss.samples} samples"]
        )
        print_table("MQTT end to end (publisher, broker, worker, database on this machine)",
                    ["measure", "result", "", "volume"], env.results)  # fmt: skip
        print_table(
            "acceptance",
            ["target", "measured", "verdict"],
            [[name, value, "info" if ok is None else ("PASS" if ok else "MISS")] for name, value, ok in env.checks],
        )
        print(f"database: {stored_lines:,} receipt lines stored, {dead} dead letters")
        if dead:
            raise RuntimeError(f"{dead} events were dead-lettered\n{worker_log.tail()}")
        missed = [name for name, _v, ok in env.checks if ok is False]
        return 1 if missed else 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
