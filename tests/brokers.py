"""Real infrastructure for the end-to-end tests: a private Mosquitto, a private PostgreSQL, worker processes.

Everything here runs on loopback and in temporary folders, and every process started here is
stopped by the context manager that started it, also when the test fails:

- `mosquitto_broker` starts the project's broker config (the lines of infra/mosquitto/tuning.conf,
  read from the file, so the tuning that production runs is what the tests exercise) on a free port.
- `private_postgres` initialises a throw-away PostgreSQL 15 cluster with TimescaleDB preloaded on a
  free port, so a test may stop and start it without disturbing the machine's main cluster.
- `WorkerProcess` runs `storepulse ingest-worker` as a subprocess (to `kill -9` it) and
  `worker_thread` runs an `IngestWorker` inside the test process.
- `Publisher` publishes with QoS 1 and remembers which messages the broker acknowledged (PUBACK).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

from ingest.db import get_engine
from ingest.migrate import upgrade
from ingest.mqtt_worker import IngestWorker
from ingest.settings import Settings
from tests.conftest import free_port, load_small_chain, port_open, unavailable

REPO = Path(__file__).resolve().parents[1]
TUNING_CONF = REPO / "infra" / "mosquitto" / "tuning.conf"
MOSQUITTO = Path(os.environ.get("STOREPULSE_TEST_MOSQUITTO", "/usr/sbin/mosquitto"))
PG_BIN = Path(os.environ.get("STOREPULSE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


# --- Mosquitto ------------------------------------------------------------------------------


def tuning_lines() -> list[str]:
    """The settings of infra/mosquitto/tuning.conf, without comments."""
    lines = [line.strip() for line in TUNING_CONF.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def broker_config(port: int, data_dir: Path, *, tuning: list[str] | None = None) -> str:
    """An anonymous loopback listener, persistence in `data_dir`, and the project's tuning."""
    settings = tuning_lines() if tuning is None else tuning
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        f"persistence_location {data_dir}/",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        # Started as root, Mosquitto drops to the user `mosquitto`, which cannot write in a
        # private temporary folder; as any other user this line has no effect.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        *settings,
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Broker:
    port: int
    log: Path
    conf: Path
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while not port_open(self.host, self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mosquitto did not start (exit {self.process.poll()}):\n{tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        # SIGTERM: Mosquitto writes its persistence file (sessions, queued messages) on the way out.
        if self.process is not None:
            _stop(self.process)

    def restart(self, down_seconds: float) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


@contextmanager
def mosquitto_broker(*, tuning: list[str] | None = None) -> Iterator[Broker]:
    """The project's broker on a free loopback port; `tuning=[]` runs Mosquitto's defaults instead."""
    if not MOSQUITTO.exists():
        unavailable(f"{MOSQUITTO} is not installed (apt-get install mosquitto)")
    tmp = Path(tempfile.mkdtemp(prefix="storepulse-mosquitto-"))
    (tmp / "data").mkdir()
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(broker_config(port, tmp / "data", tuning=tuning))
    broker = Broker(port=port, log=tmp / "mosquitto.log", conf=conf)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


# --- a private PostgreSQL -------------------------------------------------------------------


@dataclass
class PrivatePostgres:
    data_dir: Path
    socket_dir: Path
    port: int
    log: Path
    run_as: list[str]
    database: str = "storepulse"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c shared_preload_libraries=timescaledb",
                "-c timescaledb.telemetry_level=off",
                "-c max_connections=50",
            ]
        )
        done = self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-o", options, "-w",
                        "-t", "60", "start")  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{tail(self.log)}")

    def stop(self, mode: str = "fast") -> None:
        done = self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")
        if done.returncode != 0:
            raise AssertionError(f"pg_ctl stop failed: {done.stdout}{done.stderr}\n{tail(self.log)}")

    def running(self) -> bool:
        return self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "status").returncode == 0


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A migrated StorePulse database with the small chain, in a cluster of its own."""
    if not (PG_BIN / "initdb").exists():
        unavailable(f"PostgreSQL binaries not found in {PG_BIN}")
    run_as: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        try:
            postgres_user = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run a private PostgreSQL")
        run_as = ["runuser", "-u", "postgres", "--"]
    tmp = Path(tempfile.mkdtemp(prefix="storepulse-pg-"))
    os.chmod(tmp, 0o755)
    data_dir, socket_dir = tmp / "data", tmp / "sock"
    socket_dir.mkdir()
    if run_as:
        os.chown(tmp, postgres_user.pw_uid, postgres_user.pw_gid)
        os.chown(socket_dir, postgres_user.pw_uid, postgres_user.pw_gid)
    pg = PrivatePostgres(data_dir, socket_dir, free_port(), tmp / "postgres.log", run_as)
    try:
        init = pg._pg(str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync", timeout=120)  # fmt: skip
        if init.returncode != 0:
            raise AssertionError(f"initdb failed: {init.stdout}{init.stderr}")
        pg.start()
        admin = create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            if not conn.execute(text("SELECT count(*) FROM pg_available_extensions WHERE name='timescaledb'")).scalar():
                unavailable("the timescaledb extension is not installed for PostgreSQL 15")
            conn.execute(text(f'CREATE DATABASE "{pg.database}"'))
        admin.dispose()
        db = create_engine(pg.url, isolation_level="AUTOCOMMIT")
        with db.connect() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
        db.dispose()
        upgrade(pg.url)
        load_small_chain(get_engine(pg.url))
        yield pg
    finally:
        get_engine(pg.url).dispose()
        if pg.running():
            pg.stop("immediate")
        shutil.rmtree(tmp, ignore_errors=True)


# --- the ingest worker ----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """`storepulse ingest-worker` as a subprocess, with its output in `log`."""

    database_url: str
    mqtt_url: str
    topic_prefix: str
    client_id: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "STOREPULSE_ENV": "test",
            "STOREPULSE_DATABASE_URL": self.database_url,
            "STOREPULSE_MQTT_URL": self.mqtt_url,
            "STOREPULSE_MQTT_TOPIC_PREFIX": self.topic_prefix,
            "STOREPULSE_MQTT_CLIENT_ID": self.client_id,
            "PYTHONUNBUFFERED": "1",
        }
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "storepulse", "ingest-worker"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # A private working directory: no developer `.env` is read.
                cwd=self.log.parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, timeout=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def worker_process(
    database_url: str, broker: Broker, *, topic_prefix: str, client_id: str, log_dir: Path
) -> Iterator[WorkerProcess]:
    """The worker, not started yet; its log stays in `log_dir` (pytest's tmp_path) for the post-mortem."""
    worker = WorkerProcess(database_url, broker.url, topic_prefix, client_id, log_dir / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


@dataclass
class ThreadedWorker:
    worker: IngestWorker
    thread: threading.Thread
    errors: list[BaseException]

    @property
    def total_events(self) -> int:
        return self.worker.total_events

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.errors


@contextmanager
def worker_thread(database_url: str, broker: Broker, *, topic_prefix: str) -> Iterator[ThreadedWorker]:
    """An `IngestWorker` consuming in a thread of the test process; stopped on exit."""
    settings = Settings(
        _env_file=None,
        env="test",
        database_url=database_url,
        mqtt_url=broker.url,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"storepulse-test-{uuid.uuid4().hex[:8]}",
    )
    worker = IngestWorker(settings, get_engine(database_url), stats_every_s=3600)
    errors: list[BaseException] = []
    # The worker subscribes on every CONNACK; until the broker's SUBACK, publishes would be dropped.
    subscribed = threading.Event()
    worker.client.on_subscribe = lambda *_args: subscribed.set()

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # reported by `alive()` and on exit
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, name="ingest-worker", daemon=True)
    thread.start()
    try:
        if not subscribed.wait(15):
            raise AssertionError("the ingest worker did not subscribe at the broker")
        yield ThreadedWorker(worker, thread, errors)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
        if errors:
            raise AssertionError(f"the ingest worker thread died: {errors[0]!r}") from errors[0]


# --- publishing -----------------------------------------------------------------------------


@dataclass
class Sent:
    info: mqtt.MQTTMessageInfo
    event_ids: tuple[str, ...]


@dataclass
class Publisher:
    """A QoS 1 publisher that knows which of its messages the broker acknowledged."""

    broker: Broker
    max_inflight: int = 200
    sent: list[Sent] = field(default_factory=list)
    client: mqtt.Client = field(init=False)
    _connected: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(self.max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda *_args: self._connected.set()
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError("publisher: no CONNACK")

    def publish(self, topic: str, payload: bytes | str, event_ids: tuple[str, ...] = ()) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"publish to {topic} failed locally: {mqtt.error_string(info.rc)}")
        self.sent.append(Sent(info, event_ids))
        return info

    def in_flight(self) -> int:
        return sum(1 for s in self.sent if not s.info.is_published())

    def wait_all(self, timeout: float) -> None:
        wait_until(lambda: self.in_flight() == 0, timeout, f"PUBACKs ({self.in_flight()} outstanding)", 0.2)

    def acknowledged_ids(self) -> list[str]:
        return [event_id for s in self.sent if s.info.is_published() for event_id in s.event_ids]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def publisher(broker: Broker, **kwargs: Any) -> Iterator[Publisher]:
    pub = Publisher(broker, **kwargs)
    try:
        yield pub
    finally:
        pub.close()
