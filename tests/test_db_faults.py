"""Errors are told apart: a bad event is dead-lettered with its reason, a broken environment never is.

A broken environment (a missing table, column or privilege, a statement timeout, a locked or
full database, an unreachable server) says nothing about the events: they must be kept, not
acknowledged into the dead letters. The classifier is shown real errors of both databases; the
writers, the HTTP API and the MQTT worker are run against a schema broken and repaired under
them. The acceptance tests run the real `storepulse ingest-worker` process with its health
endpoint against TimescaleDB and the project's Mosquitto, break the database in the middle of a
QoS 1 stream (TEMP revoked from the ingest role, a column renamed away), watch `/healthz` turn
red with the reason, repair, and require every acknowledged event stored exactly once and not
one dead letter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

from ingest.db import get_engine, session_scope
from ingest.errors import Diagnosis, classify
from ingest.health import forget_schema_checks
from ingest.mqtt_worker import IngestWorker
from ingest.service import ingest_payloads
from ingest.settings import Settings
from tests import factories as f
from tests.brokers import Broker, mosquitto_broker, publisher, tail, wait_until, worker_process
from tests.conftest import (
    LiveServer,
    create_timescale_database,
    drop_database,
    free_port,
    load_small_chain,
    make_app,
)
from tests.test_faults import Stream, assert_exactly_once, receipts, start_and_wait_subscribed, stored_count


def diagnose(engine: Engine, sql: str, *setup: str) -> Diagnosis:
    """Run `sql` after `setup` in one transaction and classify the error it raises."""
    with engine.connect() as conn, conn.begin():
        for statement in setup:
            conn.execute(text(statement))
        with pytest.raises(Exception) as raised:
            conn.execute(text(sql))
    return classify(raised.value)


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# --- the classifier, on real errors -------------------------------------------------------------


def test_sqlite_errors_are_told_apart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'classify.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE stock (sku TEXT NOT NULL, qty INTEGER CHECK (qty >= 0))"))

    assert diagnose(engine, "INSERT INTO stock VALUES ('A', -1)") == Diagnosis(
        "data", "CHECK constraint failed: qty >= 0"
    )
    assert diagnose(engine, "INSERT INTO stock VALUES (NULL, 1)") == Diagnosis(
        "data", "NOT NULL constraint failed: stock.sku"
    )
    assert diagnose(engine, "SELECT * FROM receipts") == Diagnosis(
        "environment", "database: no such table: receipts (SQLITE_ERROR)"
    )
    assert diagnose(engine, "SELECT line_count FROM stock") == Diagnosis(
        "environment", "database: no such column: line_count (SQLITE_ERROR)"
    )

    # Another writer holds the write lock and this one cannot wait: the file is busy, not the data bad.
    impatient = create_engine(url, connect_args={"timeout": 0})
    with engine.connect() as holder:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        assert diagnose(impatient, "INSERT INTO stock VALUES ('A', 1)") == Diagnosis(
            "environment", "database: database is locked (SQLITE_BUSY)"
        )
        holder.exec_driver_sql("ROLLBACK")
    impatient.dispose()
    engine.dispose()


def test_postgresql_errors_are_told_apart_by_sqlstate(pg_engine: Engine) -> None:
    make_table = "CREATE TEMP TABLE stock (sku text NOT NULL, qty numeric(6, 2) CHECK (qty >= 0)) ON COMMIT DROP"

    assert diagnose(pg_engine, "INSERT INTO stock VALUES ('A', -1)", make_table) == Diagnosis(
        "data", 'new row for relation "stock" violates check constraint "stock_qty_check"'
    )
    assert diagnose(pg_engine, "INSERT INTO stock VALUES ('A', 123456)", make_table) == Diagnosis(
        "data", "numeric field overflow"
    )
    # NUL in text is refused by psycopg before the server sees it: still the value's fault.
    assert classify_nul_text(pg_engine) == Diagnosis("data", "PostgreSQL text fields cannot contain NUL (0x00) bytes")

    assert diagnose(pg_engine, "SELECT * FROM no_such_table") == Diagnosis(
        "environment",
        'database: relation "no_such_table" does not exist (SQLSTATE 42P01 UndefinedTable)',
    )
    assert diagnose(pg_engine, "SELECT line_count_old FROM receipts") == Diagnosis(
        "environment",
        'database: column "line_count_old" does not exist (SQLSTATE 42703 UndefinedColumn)',
    )
    assert diagnose(pg_engine, "SELECT pg_sleep(2)", "SET LOCAL statement_timeout = '50ms'") == Diagnosis(
        "environment",
        "database: canceling statement due to statement timeout (SQLSTATE 57014 QueryCanceled)",
    )
    # A role without rights on the table (pg_monitor has none on StorePulse's tables).
    assert diagnose(pg_engine, "SELECT * FROM dead_letters", "SET LOCAL ROLE pg_monitor") == Diagnosis(
        "environment",
        "database: permission denied for table dead_letters (SQLSTATE 42501 InsufficientPrivilege)",
    )

    unreachable = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/storepulse")
    with pytest.raises(Exception) as raised:
        unreachable.connect()
    diagnosis = classify(raised.value)
    assert diagnosis.kind == "environment"
    assert "connection refused" in diagnosis.reason.lower()
    unreachable.dispose()


def classify_nul_text(engine: Engine) -> Diagnosis:
    with engine.connect() as conn, pytest.raises(Exception) as raised:
        conn.execute(text("SELECT CAST(:value AS text)"), {"value": "A\x00B"})
    return classify(raised.value)


# --- the ingest service: a broken schema is not bad data ------------------------------------------


@contextmanager
def column_renamed(engine: Engine, table: str, column: str) -> Iterator[str]:
    """`table.column` is missing (renamed away) inside the block, and back afterwards whatever happens."""
    hidden = f"{column}_moved"
    with engine.begin() as conn:
        _fresh_schema(conn)
        conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN {column} TO {hidden}"))
    try:
        yield hidden
    finally:
        with engine.begin() as conn:
            _fresh_schema(conn)
            conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN {hidden} TO {column}"))
        forget_schema_checks()


def _fresh_schema(conn: Connection) -> None:
    # SQLite prepares an ALTER TABLE that opens an explicit transaction against the connection's
    # cached schema (a pooled connection may not have seen another connection's rename yet);
    # any read first makes it load the current one. DML re-prepares by itself.
    if conn.dialect.name == "sqlite":
        conn.execute(text("SELECT count(*) FROM sqlite_master"))


def ingest(engine: Engine, events: list[dict[str, Any]]) -> list[tuple[str | None, str, str | None]]:
    with session_scope(engine) as session:
        results = ingest_payloads(events, session=session, source="test")
    return [(r.event_id, r.status, r.error) for r in results]


def test_a_missing_column_keeps_good_events_out_of_the_dead_letters(chain: Engine) -> None:
    events = [f.receipt(1), f.receipt(2), f.footfall(1)]
    with column_renamed(chain, "receipts", "line_count"), pytest.raises(Exception) as raised:
        ingest(chain, events)
    diagnosis = classify(raised.value)
    assert diagnosis.kind == "environment"
    assert "line_count" in diagnosis.reason
    assert (count(chain, "dead_letters"), count(chain, "receipts"), count(chain, "footfall")) == (0, 0, 0)

    # Repaired: the same events, sent again, are stored.
    assert ingest(chain, events) == [
        ("S001-T1-1", "accepted", None),
        ("S001-T1-2", "accepted", None),
        ("ff-S001-1", "accepted", None),
    ]
    assert count(chain, "dead_letters") == 0


@contextmanager
def refusing_staff(engine: Engine, staff_id: str) -> Iterator[str]:
    """The database itself refuses receipts by `staff_id`: a data error the contract cannot see.

    Yields a pattern of the dead-letter reason."""
    if engine.dialect.name == "postgresql":
        add = f"ALTER TABLE receipts ADD CONSTRAINT refuse_staff CHECK (staff_id IS DISTINCT FROM '{staff_id}')"
        drop = "ALTER TABLE receipts DROP CONSTRAINT refuse_staff"
        # TimescaleDB names the chunk the row was routed to.
        reason = r'database: new row for relation "_hyper_\d+_\d+_chunk" violates check constraint "refuse_staff"'
    else:
        add = (
            f"CREATE TRIGGER refuse_staff BEFORE INSERT ON receipts WHEN NEW.staff_id = '{staff_id}' "
            "BEGIN SELECT RAISE(ABORT, 'staff refused by the database'); END"
        )
        drop = "DROP TRIGGER refuse_staff"
        reason = "database: staff refused by the database"
    with engine.begin() as conn:
        conn.execute(text(add))
    try:
        yield reason
    finally:
        with engine.begin() as conn:
            conn.execute(text(drop))


def test_an_event_the_database_refuses_is_dead_lettered_with_the_reason(chain: Engine) -> None:
    bad = f.receipt(2) | {"staff_id": "E9999"}
    with refusing_staff(chain, "E9999") as reason:
        results = ingest(chain, [f.receipt(1), bad, f.receipt(3)])
    assert [(event_id, status) for event_id, status, _ in results] == [
        ("S001-T1-1", "accepted"),
        ("S001-T1-2", "rejected"),
        ("S001-T1-3", "accepted"),
    ]
    assert re.fullmatch(reason, results[1][2] or ""), results[1][2]
    with chain.connect() as conn:
        letters = conn.execute(text("SELECT event_id, reason FROM dead_letters")).all()
    assert [letter.event_id for letter in letters] == ["S001-T1-2"]
    assert letters[0].reason == results[1][2]
    assert count(chain, "receipts") == 2


# --- the HTTP API ------------------------------------------------------------------------------------


def test_http_ingest_answers_503_and_healthz_turns_red_while_a_column_is_missing(chain: Engine) -> None:
    from ingest.tokens import create_token

    with session_scope(chain) as session:
        token = create_token(session=session, store_id="S001", name="till-1").token
    headers = {"Authorization": f"Bearer {token}"}
    batch = {"events": [f.receipt(1), f.receipt(2)]}
    forget_schema_checks()
    with LiveServer(make_app(chain)) as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        with column_renamed(chain, "receipts", "line_count"):
            forget_schema_checks()
            refused = httpx.post(f"{server.url}/api/v1/events", json=batch, headers=headers, timeout=30)
            health = httpx.get(f"{server.url}/healthz", timeout=30)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "30"
        detail = refused.json()["detail"]
        assert detail.startswith("storage unavailable, nothing was stored; send the batch again later (database: ")
        assert "line_count" in detail
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["reason"] == (
            "database schema: column receipts.line_count missing (run `storepulse db upgrade`)"
        )
        assert health.json()["ingest"]["ok"] is False
        assert count(chain, "dead_letters") == 0

        # Repaired: the device sends the batch again and it is stored; health is green again.
        stored = httpx.post(f"{server.url}/api/v1/events", json=batch, headers=headers, timeout=30)
        assert stored.status_code == 200
        assert [r["status"] for r in stored.json()["results"]] == ["accepted", "accepted"]
        health = httpx.get(f"{server.url}/healthz")
        assert health.status_code == 200
        assert health.json()["ingest"] == {"ok": True, "detail": "ok"}
    assert (count(chain, "receipts"), count(chain, "dead_letters")) == (2, 0)


# --- the MQTT worker: acceptance on TimescaleDB and the project's Mosquitto ---------------------------


@pytest.fixture
def broker() -> Iterator[Broker]:
    with mosquitto_broker() as running:
        yield running


@pytest.fixture
def fresh_timescale() -> Iterator[str]:
    """A database of its own: these tests change privileges and columns under the worker."""
    url = create_timescale_database("storepulse_dbfaults")
    load_small_chain(get_engine(url))
    try:
        yield url
    finally:
        drop_database(url)


@contextmanager
def ingest_role(url: str) -> Iterator[str]:
    """A non-superuser login role with what the ingest path needs (minus nothing); its database URL."""
    role = f"storepulse_ingest_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    try:
        yield make_url(url).set(username=role).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def worker_health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    except httpx.TransportError as exc:
        return 0, {"error": str(exc)}
    return response.status_code, response.json()


def run_broken_stream(
    *,
    worker_url: str,
    admin_url: str,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    break_it: str | list[str],
    repair: str | list[str],
    red_reason: str,
    schema_reason: str,
) -> None:
    """Stream receipts over MQTT, break the database mid-stream, see the worker red, repair, check."""
    engine = get_engine(admin_url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    run = uuid.uuid4().hex[:8]
    prefix = f"storepulse-dbfaults-{run}/v1"
    events = receipts(4_000, run)
    health_port = free_port()
    monkeypatch.setenv("STOREPULSE_INGEST_HEALTH_PORT", str(health_port))
    monkeypatch.setenv("STOREPULSE_INGEST_RETRY_MAX_S", "2")
    reds: list[dict[str, Any]] = []
    with (
        worker_process(
            worker_url, broker, topic_prefix=prefix, client_id=f"storepulse-ingest-{run}", log_dir=tmp_path
        ) as worker,
        publisher(broker, max_inflight=200) as pub,
    ):
        start_and_wait_subscribed(worker, pub, prefix, engine)
        wait_until(lambda: worker_health(health_port)[0] == 200, 20, "a green worker /healthz")
        stream = Stream(pub, events, prefix, rate=400)
        stream.start()
        wait_until(lambda: stored_count(engine) >= 600, 60, "600 stored receipts")
        with admin.connect() as conn:
            for statement in [break_it] if isinstance(break_it, str) else break_it:
                conn.execute(text(statement))

        def red() -> bool:
            status, body = worker_health(health_port)
            reds.append(body)
            return status == 503 and red_reason in body.get("reason", "")

        try:
            wait_until(red, 30, f"a red worker /healthz naming {red_reason!r}", 0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer {reds[-1]}\nworker log:\n{tail(worker.log)}") from None
        frozen = stored_count(engine)
        time.sleep(4)  # broken for a while: nothing is stored, nothing is dead-lettered
        assert worker.alive(), f"the worker died while the database was broken:\n{tail(worker.log)}"
        assert stored_count(engine) == frozen, "events were stored while the database was broken"
        assert count(engine, "dead_letters") == 0, "good events were dead-lettered while the database was broken"
        status, body = worker_health(health_port)
        assert status == 503 and red_reason in body["reason"] and body["status"] == "failing", body
        assert body["kept_messages"] >= 1 and body["since"].endswith("Z")
        assert body["schema"] == schema_reason
        with admin.connect() as conn:
            for statement in [repair] if isinstance(repair, str) else repair:
                conn.execute(text(statement))

        stream.join(timeout=90)
        assert not stream.is_alive() and stream.error is None, f"publisher failed: {stream.error!r}"
        pub.wait_all(timeout=60)
        acknowledged = set(pub.acknowledged_ids())
        wait_until(lambda: stored_count(engine) >= len(acknowledged), 90, "every acknowledged receipt stored", 0.5)
        wait_until(lambda: worker_health(health_port)[0] == 200, 20, "the worker /healthz green again", 0.5)
        assert worker.alive(), f"the worker exited:\n{tail(worker.log)}"
    admin.dispose()

    published = {e["event_id"] for e in events} | {i for s in pub.sent for i in s.event_ids}
    assert frozen < len(events), "the database broke after the stream had ended"
    assert len(acknowledged) == len(published)
    assert_exactly_once(engine, acknowledged, published, worker)
    log = worker.output()
    errors = [line for line in log.splitlines() if " ERROR " in line and "database unavailable" in line]
    recovered = re.findall(r"database usable again after \d+ s and (\d+) failed attempts", log)
    assert recovered, f"the worker never said it recovered:\n{tail(worker.log)}"
    assert sum(int(n) for n in recovered) >= 3, f"too few retries to tell:\n{tail(worker.log)}"
    # Told when it starts (and then once a minute, or when the reason changes), not at every retry.
    naming = [line for line in errors if red_reason in line]
    assert len(naming) == 1, f"{len(naming)} ERRORs naming {red_reason!r} in a few seconds:\n{tail(worker.log)}"


@pytest.mark.slow
def test_temp_revoked_mid_stream_keeps_every_event_and_dead_letters_none(
    fresh_timescale: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = make_url(fresh_timescale).database
    with ingest_role(fresh_timescale) as worker_url:
        role = make_url(worker_url).username
        run_broken_stream(
            worker_url=worker_url,
            admin_url=fresh_timescale,
            broker=broker,
            tmp_path=tmp_path,
            monkeypatch=monkeypatch,
            # A session keeps the right it started with: the revocation bites on the next
            # connection, as after a database restart or failover.
            break_it=[
                f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
            ],
            repair=f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC',
            red_reason="permission denied to create temporary tables",
            schema_reason=(
                f"database privileges: {role} may not create temporary tables in {database} (the COPY writer "
                f"stages batches in them): GRANT TEMPORARY ON DATABASE {database} TO {role}"
            ),
        )


@pytest.mark.slow
def test_column_missing_mid_stream_keeps_every_event_and_dead_letters_none(
    fresh_timescale: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_broken_stream(
        worker_url=fresh_timescale,
        admin_url=fresh_timescale,
        broker=broker,
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
        break_it="ALTER TABLE receipts RENAME COLUMN line_count TO line_count_moved",
        repair="ALTER TABLE receipts RENAME COLUMN line_count_moved TO line_count",
        red_reason='column "line_count" does not exist (SQLSTATE 42703 UndefinedColumn)',
        schema_reason="database schema: column receipts.line_count missing (run `storepulse db upgrade`)",
    )


def test_worker_that_cannot_start_says_why_and_exits_non_zero(tmp_path: Path, broker: Broker) -> None:
    with free_listening_port() as busy:
        done = subprocess.run(
            [sys.executable, "-m", "storepulse", "ingest-worker", "--health-port", str(busy)],
            env={
                **os.environ,
                "STOREPULSE_ENV": "test",
                "STOREPULSE_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
                "STOREPULSE_MQTT_URL": broker.url,
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    expected = (
        "CRITICAL ingest.mqtt_worker: ingest worker cannot start: "
        f"ingest_health_port: cannot listen on 127.0.0.1:{busy} ("
    )
    assert expected in done.stderr, done.stderr


def test_worker_stopped_by_an_unexpected_error_says_why_and_exits_non_zero(
    chain: Engine, mosquitto: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    def broken_callback(_events: int) -> None:
        raise RuntimeError("the on_commit callback broke")

    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    settings = Settings(
        _env_file=None,
        env="test",
        database_url=chain.url.render_as_string(hide_password=False),
        mqtt_url=f"mqtt://{mosquitto[0]}:{mosquitto[1]}",
        mqtt_topic_prefix=prefix,
        mqtt_client_id=f"storepulse-test-{uuid.uuid4().hex[:8]}",
    )
    worker = IngestWorker(settings, chain, on_commit=broken_callback)
    subscribed = threading.Event()
    worker.client.on_subscribe = lambda *_args: subscribed.set()
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(worker.run_reporting()), daemon=True)
    thread.start()
    try:
        assert subscribed.wait(15), "the worker did not subscribe"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect(*mosquitto)
        client.loop_start()
        client.publish(f"{prefix}/S001/pos/T1/events", json.dumps(f.receipt(1)), qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        thread.join(30)
    finally:
        worker.request_stop()
        thread.join(15)
    assert exit_codes == [1]
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical == [
        "ingest worker exits on an unexpected error: internal error RuntimeError: the on_commit callback broke; "
        "unacknowledged messages will be redelivered"
    ]
    assert count(chain, "receipts") == 1


@contextmanager
def free_listening_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])
