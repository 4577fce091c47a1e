"""The MQTT ingest worker against the machine's real Mosquitto (127.0.0.1:1883)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, text

from ingest.db import session_scope
from ingest.mqtt_worker import IngestWorker, parse_topic, subscriptions
from ingest.settings import Settings
from tests import factories as f


def settings_for(engine: Engine, broker: tuple[str, int], prefix: str, **extra: object) -> Settings:
    host, port = broker
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        mqtt_url=f"mqtt://{host}:{port}",
        mqtt_topic_prefix=prefix,
        mqtt_client_id=f"test-worker-{uuid.uuid4().hex[:8]}",
        **extra,  # type: ignore[arg-type]
    )


@contextmanager
def running_worker(settings: Settings, engine: Engine) -> Iterator[IngestWorker]:
    worker = IngestWorker(settings, engine, stats_every_s=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    assert worker.connected.wait(10), "worker did not connect"
    time.sleep(0.3)  # let the SUBACK land before anything is published
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(15)
        assert not thread.is_alive()


@contextmanager
def publisher(broker: tuple[str, int]) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(*broker)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def publish_all(client: mqtt.Client, messages: list[tuple[str, object]]) -> None:
    infos = []
    for topic, payload in messages:
        body = payload if isinstance(payload, bytes) else json.dumps(payload)
        infos.append(client.publish(topic, body, qos=1))
    for info in infos:
        info.wait_for_publish(10)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def scalar(engine: Engine, sql: str) -> int:
    with session_scope(engine) as session:
        return int(session.execute(text(sql)).scalar() or 0)


def test_topics_and_shared_subscriptions() -> None:
    assert parse_topic("storepulse/v1", "storepulse/v1/S001/pos/T1/events") == ("S001", "pos")
    assert parse_topic("storepulse/v1", "storepulse/v1/S001/footfall/door-1") == ("S001", "footfall")
    assert parse_topic("storepulse/v1", "storepulse/v1/S001/stock") == ("S001", "stock")
    assert parse_topic("storepulse/v1", "storepulse/v1/S001/pos/T1/ack") == ("S001", "ack")
    assert parse_topic("storepulse/v1", "storepulse/v1/S001/promotions") is None
    assert subscriptions("sp/v1", "ingest")[0] == "$share/ingest/sp/v1/+/pos/+/events"


def test_events_on_every_topic_are_stored_and_transport_errors_dead_lettered(
    chain: Engine, mosquitto: tuple[str, int]
) -> None:
    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    with running_worker(settings_for(chain, mosquitto, prefix), chain), publisher(mosquitto) as client:
        publish_all(client, [
            (f"{prefix}/S001/pos/T1/events", {"events": [f.receipt(n) for n in range(10)]}),
            (f"{prefix}/S001/pos/T1/events", f.step(1)),
            (f"{prefix}/S001/pos/T1/events", f.prompt_answer(1)),
            (f"{prefix}/S001/footfall/door-1", f.footfall(1)),
            (f"{prefix}/S001/stock", {"events": [f.stock(1)]}),
            (f"{prefix}/S002/pos/T1/events", f.receipt(100)),  # payload says S001
            (f"{prefix}/S001/footfall/door-1", f.receipt(101)),  # a receipt on the counter topic
            (f"{prefix}/S001/pos/T1/events", b"\xff not json"),
            (f"{prefix}/S001/pos/T1/events", {"events": "nope"}),
            (f"{prefix}/S001/pos/T1/ack", {"promotions_version": 3}),
            (f"{prefix}/S001/pos/T1/ack", {"promotions_version": 3}),  # a redelivered ack: stored once
            (f"{prefix}/S001/pos/T2/ack", {"promotions_version": "3"}),
            (f"{prefix}/S999/pos/T1/ack", {"promotions_version": 1}),
        ])  # fmt: skip
        wait_for(lambda: scalar(chain, "SELECT count(*) FROM dead_letters") == 6)
        wait_for(lambda: scalar(chain, "SELECT count(*) FROM stock_snapshots") == 1)
    assert scalar(chain, "SELECT count(*) FROM receipts") == 10
    assert scalar(chain, "SELECT count(*) FROM receipt_lines") == 40
    assert scalar(chain, "SELECT count(*) FROM consultation_steps") == 1
    assert scalar(chain, "SELECT count(*) FROM prompt_answers") == 1
    assert scalar(chain, "SELECT count(*) FROM footfall") == 1
    with session_scope(chain) as session:
        letters = session.execute(text("SELECT source, reason FROM dead_letters ORDER BY id")).all()
    reasons = sorted(reason for _, reason in letters)
    assert reasons[0] == "events: must be a list of events"
    assert reasons[1].startswith("payload: not valid JSON (str is not valid UTF-8")
    assert reasons[2:] == [
        "promotions_version: expected a positive integer, got '3'",
        "store_id: payload store 'S001' does not match topic store 'S002'",
        "store_id: unknown store 'S999'",
        "type: 'receipt' events are not accepted on the footfall topic",
    ]
    with session_scope(chain) as session:
        acks = session.execute(text("SELECT store_id, terminal_id, promotions_version FROM promotion_acks")).all()
    assert [tuple(a) for a in acks] == [("S001", "T1", 3)]
    mismatch = "store_id: payload store 'S001' does not match topic store 'S002'"
    assert (f"mqtt:{prefix}/S002/pos/T1/events", mismatch) in letters


def test_shared_subscription_splits_the_load_without_duplicates(chain: Engine, mosquitto: tuple[str, int]) -> None:
    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    first = settings_for(chain, mosquitto, prefix, mqtt_shared_group="ingest")
    second = settings_for(chain, mosquitto, prefix, mqtt_shared_group="ingest")
    with (
        running_worker(first, chain) as worker_a,
        running_worker(second, chain) as worker_b,
        publisher(mosquitto) as client,
    ):
        publish_all(client, [(f"{prefix}/S001/pos/T1/events", f.receipt(n)) for n in range(200)])
        wait_for(lambda: worker_a.total_events + worker_b.total_events >= 200)
    assert worker_a.total_events > 0 and worker_b.total_events > 0
    assert worker_a.total_events + worker_b.total_events == 200
    assert scalar(chain, "SELECT count(*) FROM receipts") == 200


def test_persistent_session_delivers_what_arrived_while_the_worker_was_away(
    pg_chain: Engine, mosquitto: tuple[str, int]
) -> None:
    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    settings = settings_for(pg_chain, mosquitto, prefix)
    with running_worker(settings, pg_chain):
        pass  # the session and its subscriptions now exist on the broker
    with publisher(mosquitto) as client:
        publish_all(client, [(f"{prefix}/S001/pos/T1/events", f.receipt(n)) for n in range(300)])
    assert scalar(pg_chain, "SELECT count(*) FROM receipts") == 0
    with running_worker(settings, pg_chain):
        wait_for(lambda: scalar(pg_chain, "SELECT count(*) FROM receipts") == 300)


def test_worker_process_stops_cleanly_on_sigterm(pg_chain: Engine, mosquitto: tuple[str, int]) -> None:
    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    settings = settings_for(pg_chain, mosquitto, prefix)
    env = {
        **os.environ,
        "STOREPULSE_DATABASE_URL": settings.effective_database_url,
        "STOREPULSE_MQTT_URL": settings.mqtt_url or "",
        "STOREPULSE_MQTT_TOPIC_PREFIX": prefix,
        "STOREPULSE_MQTT_CLIENT_ID": settings.mqtt_client_id,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "storepulse", "ingest-worker"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        assert process.stderr is not None
        for line in process.stderr:
            if "subscribed to" in line or time.monotonic() > deadline:
                break
        with publisher(mosquitto) as client:
            publish_all(client, [(f"{prefix}/S001/pos/T1/events", f.receipt(n)) for n in range(50)])
        wait_for(lambda: scalar(pg_chain, "SELECT count(*) FROM receipts") == 50)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        rest = process.stderr.read()
        assert "received SIGTERM" in rest and "ingest worker stopped; 50 events stored" in rest
    finally:
        if process.poll() is None:
            process.kill()
