"""No loss and no duplicates when things break: a worker killed with SIGKILL, PostgreSQL stopped for 20 s,
the broker restarted.

The broker is the project's own (infra/mosquitto/tuning.conf read from the file) on a free loopback
port; the worker is the real `storepulse ingest-worker` process with a fixed client id, i.e. a
persistent MQTT session. A publisher streams receipts with QoS 1 and keeps every message the broker
acknowledged (PUBACK): from that moment the system owns the event, so each of those must end up
stored exactly once (the stream holds only valid events, so the dead-letter table must stay empty).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from ingest.db import get_engine
from tests import factories as f
from tests.brokers import (
    Broker,
    PrivatePostgres,
    Publisher,
    WorkerProcess,
    mosquitto_broker,
    private_postgres,
    publisher,
    tail,
    wait_until,
    worker_process,
)

pytestmark = pytest.mark.slow

STORES = ("S001", "S002", "S003")
LINES = 4


@pytest.fixture
def broker() -> Iterator[Broker]:
    with mosquitto_broker() as running:
        yield running


def receipts(count: int, run: str) -> list[dict]:
    """Valid receipts of the last day (never "in the future"), unique ids for this run."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    return [
        f.receipt(n, store_id=STORES[n % 3], lines=LINES, at=base + timedelta(milliseconds=n), run=run)
        | {"event_id": f"{run}-{n}"}
        for n in range(count)
    ]


class Stream(threading.Thread):
    """Publishes the events, `per_message` to a message, at about `rate` events per second."""

    def __init__(self, pub: Publisher, events: list[dict], prefix: str, rate: float, per_message: int = 1) -> None:
        super().__init__(name="publisher", daemon=True)
        self.pub, self.events, self.prefix, self.rate, self.per_message = pub, events, prefix, rate, per_message
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            started = time.monotonic()
            for start in range(0, len(self.events), self.per_message):
                chunk = self.events[start : start + self.per_message]
                body = chunk[0] if len(chunk) == 1 else {"events": chunk}
                topic = f"{self.prefix}/{chunk[0]['store_id']}/pos/T1/events"
                # One store per message: the topic's store must match every event's.
                assert all(e["store_id"] == chunk[0]["store_id"] for e in chunk)
                self.pub.publish(topic, json.dumps(body), tuple(e["event_id"] for e in chunk))
                self.published += len(chunk)
                ahead = self.published / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:
            self.error = exc


def stored_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM receipts")).scalar_one())


def assert_exactly_once(engine: Engine, acknowledged: set[str], published: set[str], worker: WorkerProcess) -> None:
    with engine.connect() as conn:
        counts = {e: int(n) for e, n in conn.execute(text("SELECT event_id, count(*) FROM receipts GROUP BY 1"))}
        lines = {e: int(n) for e, n in conn.execute(text("SELECT event_id, count(*) FROM receipt_lines GROUP BY 1"))}
        dead = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
    missing = sorted(e for e in acknowledged if e not in counts)
    assert not missing, (
        f"{len(missing)} acknowledged events were lost, e.g. {missing[:5]}\nworker log:\n{tail(worker.log, 60)}"
    )
    assert {e: n for e, n in counts.items() if n != 1} == {}, "an event is stored more than once"
    assert set(counts) <= published, "stored events that nobody published"
    assert {e: n for e, n in lines.items() if n != LINES} == {}, "receipts with a wrong number of lines"
    assert sum(lines.values()) == LINES * len(counts)
    assert dead == 0, "valid events were dead-lettered"


def wait_stored(engine: Engine, expected: int, timeout: float) -> None:
    """Until `expected` receipts are stored, then until nothing changes any more."""
    try:
        wait_until(lambda: stored_count(engine) >= expected, timeout, f"{expected} stored receipts", 0.5)
    except AssertionError:
        return  # the exactly-once assertion tells what is missing
    last, quiet_since = stored_count(engine), time.monotonic()
    while time.monotonic() - quiet_since < 2:
        time.sleep(0.5)
        now = stored_count(engine)
        if now != last:
            last, quiet_since = now, time.monotonic()


def start_and_wait_subscribed(worker: WorkerProcess, pub: Publisher, prefix: str, engine: Engine) -> None:
    """Start the worker and prove it consumes: a probe event must arrive in the database."""
    worker.start()
    probe = f.receipt(0, lines=LINES, at=datetime.now(UTC) - timedelta(days=2)) | {"event_id": f"probe-{uuid.uuid4()}"}
    deadline = time.monotonic() + 30
    while stored_count(engine) == 0:
        assert worker.alive(), f"the worker exited:\n{tail(worker.log)}"
        assert time.monotonic() < deadline, f"the worker consumes nothing:\n{tail(worker.log)}"
        # Until the worker's subscription exists the broker drops what is published.
        pub.publish(f"{prefix}/S001/pos/T1/events", json.dumps(probe), (probe["event_id"],))
        time.sleep(0.5)


def test_worker_killed_with_sigkill_mid_stream_loses_and_duplicates_nothing(
    pg_chain: Engine, timescale_url: str, broker: Broker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    prefix = f"storepulse-faults-{run}/v1"
    events = receipts(50_000, run)
    with (
        worker_process(
            timescale_url, broker, topic_prefix=prefix, client_id=f"storepulse-ingest-{run}", log_dir=tmp_path
        ) as worker,
        publisher(broker, max_inflight=500) as pub,
    ):
        start_and_wait_subscribed(worker, pub, prefix, pg_chain)
        stream = Stream(pub, events, prefix, rate=3_000)
        stream.start()
        wait_until(lambda: stored_count(pg_chain) >= 5_000 or not stream.is_alive(), 60, "5,000 stored receipts")
        assert stream.is_alive(), "the stream ended before the kill: raise the event count or lower the rate"
        worker.kill9()
        killed_at = stored_count(pg_chain)
        time.sleep(2)  # the stream goes on; the broker queues for the dead worker's session
        worker.start()
        stream.join(timeout=90)
        assert not stream.is_alive() and stream.error is None, f"publisher failed: {stream.error!r}"
        pub.wait_all(timeout=60)
        acknowledged = set(pub.acknowledged_ids())
        wait_stored(pg_chain, len(acknowledged), timeout=90)
        assert worker.alive(), f"the restarted worker exited:\n{tail(worker.log)}"

    published = {e["event_id"] for e in events} | {i for s in pub.sent for i in s.event_ids}
    assert 5_000 <= killed_at < len(events), "the kill did not happen mid-stream"
    assert len(acknowledged) == len(published), "the broker did not acknowledge every publish"
    assert "session present: True" in worker.output().split("--- start 2 ---")[1], "no persistent session"
    assert_exactly_once(pg_chain, acknowledged, published, worker)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as pg:
        yield pg


def test_postgres_down_for_20_s_mid_stream_loses_and_duplicates_nothing(
    private_pg: PrivatePostgres, broker: Broker, tmp_path: Path
) -> None:
    engine = get_engine(private_pg.url)
    run = uuid.uuid4().hex[:8]
    prefix = f"storepulse-faults-{run}/v1"
    events = receipts(30_000, run)
    with (
        worker_process(
            private_pg.url, broker, topic_prefix=prefix, client_id=f"storepulse-ingest-{run}", log_dir=tmp_path
        ) as worker,
        publisher(broker, max_inflight=500) as pub,
    ):
        start_and_wait_subscribed(worker, pub, prefix, engine)
        stream = Stream(pub, events, prefix, rate=1_000)
        stream.start()
        wait_until(lambda: stored_count(engine) >= 3_000, 60, "3,000 stored receipts")
        engine.dispose()
        private_pg.stop("fast")
        stopped_while = stream.published
        time.sleep(20)
        assert worker.alive(), f"the worker died while the database was down:\n{tail(worker.log)}"
        private_pg.start()
        stream.join(timeout=90)
        assert not stream.is_alive() and stream.error is None, f"publisher failed: {stream.error!r}"
        pub.wait_all(timeout=60)
        acknowledged = set(pub.acknowledged_ids())
        wait_stored(engine, len(acknowledged), timeout=90)
        assert worker.alive(), f"the worker exited after the outage:\n{tail(worker.log)}"
        assert worker.starts == 1

    published = {e["event_id"] for e in events} | {i for s in pub.sent for i in s.event_ids}
    assert stopped_while < len(events), "the outage did not happen mid-stream"
    assert "database unavailable" in worker.output(), "the worker never noticed the outage"
    assert len(acknowledged) == len(published)
    assert_exactly_once(engine, acknowledged, published, worker)


def test_worker_reconnects_after_a_broker_restart_and_loses_nothing(
    pg_chain: Engine, timescale_url: str, broker: Broker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    prefix = f"storepulse-faults-{run}/v1"
    events = receipts(6_000, run)
    acknowledged: set[str] = set()
    published: set[str] = {e["event_id"] for e in events}
    with worker_process(
        timescale_url, broker, topic_prefix=prefix, client_id=f"storepulse-ingest-{run}", log_dir=tmp_path
    ) as worker:
        for part, chunk in enumerate((events[:3_000], events[3_000:])):
            with publisher(broker, max_inflight=500) as pub:
                if part == 0:
                    start_and_wait_subscribed(worker, pub, prefix, pg_chain)
                stream = Stream(pub, chunk, prefix, rate=3_000)
                stream.run()
                assert stream.error is None, f"publisher failed: {stream.error!r}"
                pub.wait_all(timeout=60)
                acknowledged |= set(pub.acknowledged_ids())
                published |= {i for s in pub.sent for i in s.event_ids}
            if part == 0:
                # Down while the worker still holds unacknowledged batches in its session.
                broker.restart(down_seconds=3)
        wait_stored(pg_chain, len(acknowledged), timeout=60)
        assert worker.alive(), f"the worker exited:\n{tail(worker.log)}"
    log = worker.output()
    assert worker.starts == 1
    assert "disconnected from broker" in log, "the restart was not noticed"
    assert "session present: True" in log, "the worker did not get its session back after the restart"
    assert len(acknowledged) == len(published)
    assert_exactly_once(pg_chain, acknowledged, published, worker)
