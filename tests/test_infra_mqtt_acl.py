"""The production broker config and ACL, enforced by a real Mosquitto.

A throwaway Mosquitto is started on a free port of 127.0.0.1 with infra/mosquitto/mosquitto.conf
(container paths rewritten to a temporary folder), infra/mosquitto/acl, infra/mosquitto/tuning.conf
and a password file made by infra/mosquitto/make-store-users. The checks are the ones the ACL
exists for: a store publishes only under its own topics (a denied publish is silently dropped by
Mosquitto, so we look at what a subscriber receives), reads only its own promotions, and nobody
connects without a password.
"""

from __future__ import annotations

import os
import pwd
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from tests.conftest import free_port, port_open, unavailable

MOSQUITTO = Path("/usr/sbin/mosquitto")
INFRA = Path(__file__).resolve().parents[1] / "infra" / "mosquitto"
PREFIX = "storepulse/v1"
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Broker:
    port: int
    passwords: dict[str, str]
    log: Path


def test_config(tmp: Path, port: int) -> str:
    """The production mosquitto.conf with its container paths pointed at `tmp`."""
    text = (INFRA / "mosquitto.conf").read_text()
    replacements = {
        "listener 1883\n": f"listener {port} 127.0.0.1\n",
        "/mosquitto/config/passwd": str(tmp / "passwd"),
        "/mosquitto/config/acl": str(INFRA / "acl"),
        "/mosquitto/data/": f"{tmp / 'data'}/",
        "/mosquitto/config/conf.d": str(tmp / "conf.d"),
    }
    for old, new in replacements.items():
        assert old in text, f"infra/mosquitto/mosquitto.conf no longer contains {old!r}"
        text = text.replace(old, new)
    assert "allow_anonymous false" in text
    # Mosquitto started as root drops to the user `mosquitto`, which cannot read pytest's
    # private temporary folder; as any other user this line has no effect.
    return text + f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"


def make_users(passwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INFRA / "make-store-users"), "-o", str(passwd), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not MOSQUITTO.exists():
        unavailable(f"{MOSQUITTO} is not installed (apt-get install mosquitto)")
    if shutil.which("mosquitto_passwd") is None:
        unavailable("mosquitto_passwd is not installed (apt-get install mosquitto)")
    tmp = tmp_path_factory.mktemp("mosquitto")
    (tmp / "data").mkdir()
    (tmp / "conf.d").mkdir()
    shutil.copy(INFRA / "tuning.conf", tmp / "conf.d" / "tuning.conf")

    ingest_password = secrets.token_hex(12)
    made = make_users(tmp / "passwd", "S001", "S002", "--ingest-password", ingest_password)
    assert made.returncode == 0, made.stderr
    passwords = dict(line.split("\t") for line in made.stdout.splitlines())
    assert set(passwords) == {"S001", "S002"}
    passwords["storepulse-ingest"] = ingest_password

    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(test_config(tmp, port))
    log = tmp / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        yield Broker(port=port, passwords=passwords, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Client:
    """A small synchronous wrapper around a paho MQTT v5 client."""

    def __init__(self, broker: Broker, user: str | None, password: str | None = None, *, name: str = "") -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: Any = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._granted: list[Any] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acl-test-{name or user}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else broker.passwords[user])
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.connack = reason_code
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reason_codes: list[Any], _props: Any) -> None:
        self._granted = reason_codes
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, message.payload))

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def subscribe(self, *topics: str) -> list[Any]:
        self._subscribed.clear()
        self.client.subscribe([(topic, mqtt.SubscribeOptions(qos=1)) for topic in topics])
        assert self._subscribed.wait(TIMEOUT_S), "no SUBACK"
        return self._granted

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=Properties(3))  # 3 = PUBLISH
        info.wait_for_publish(TIMEOUT_S)
        # Mosquitto acknowledges a denied QoS 1 publish like any other: the drop is silent.
        assert info.is_published()

    def received_until(self, marker_topic: str) -> list[tuple[str, bytes]]:
        """Everything received up to and including the first message on `marker_topic`."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"nothing on {marker_topic} within {TIMEOUT_S}s; got {got}")
            try:
                topic, payload = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            got.append((topic, payload))
            if topic == marker_topic:
                # Anything still in flight from earlier publishes would arrive before the
                # marker (same publisher, same QoS); give stragglers a moment all the same.
                time.sleep(0.3)
                while not self.messages.empty():
                    got.append(self.messages.get_nowait())
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_store_publishes_only_under_its_own_store(broker: Broker) -> None:
    ingest = Client(broker, "storepulse-ingest", name="plain")
    shared = Client(broker, "storepulse-ingest", name="shared")
    s001 = Client(broker, "S001")
    try:
        assert ingest.subscribe(f"{PREFIX}/#")[0].value == 1
        assert shared.subscribe(f"$share/storepulse/{PREFIX}/+/pos/+/events")[0].value == 1

        s001.publish(f"{PREFIX}/S002/pos/T1/events", '{"store_id": "S002", "spoofed": true}')
        s001.publish(f"{PREFIX}/S002/footfall/door-1", '{"spoofed": true}')
        s001.publish(f"{PREFIX}/S002/stock", '{"spoofed": true}')
        s001.publish(f"{PREFIX}/S001/promotions", '{"version": 999, "spoofed": true}')
        s001.publish(f"{PREFIX}/S001/footfall/door-1", '{"store_id": "S001"}')
        s001.publish(f"{PREFIX}/S001/stock", '{"store_id": "S001"}')
        s001.publish(f"{PREFIX}/S001/pos/T1/ack", '{"promotions_version": 1}')
        s001.publish(f"{PREFIX}/S001/pos/T1/events", '{"store_id": "S001"}')

        plain_topics = [topic for topic, _ in ingest.received_until(f"{PREFIX}/S001/pos/T1/events")]
        assert plain_topics == [
            f"{PREFIX}/S001/footfall/door-1",
            f"{PREFIX}/S001/stock",
            f"{PREFIX}/S001/pos/T1/ack",
            f"{PREFIX}/S001/pos/T1/events",
        ]
        shared_topics = [topic for topic, _ in shared.received_until(f"{PREFIX}/S001/pos/T1/events")]
        assert shared_topics == [f"{PREFIX}/S001/pos/T1/events"]
        assert not (broker.log.read_text() and "S002/pos/T1/events" in "".join(shared_topics))
    finally:
        for client in (ingest, shared, s001):
            client.close()


def test_store_reads_only_its_own_promotions(broker: Broker) -> None:
    ingest = Client(broker, "storepulse-ingest")
    try:
        ingest.publish(f"{PREFIX}/S001/promotions", '{"store_id": "S001", "version": 1}', retain=True)
        ingest.publish(f"{PREFIX}/S002/promotions", '{"store_id": "S002", "version": 1}', retain=True)
    finally:
        ingest.close()

    s001 = Client(broker, "S001")
    s002 = Client(broker, "S002")
    try:
        s001.subscribe(f"{PREFIX}/#", f"{PREFIX}/S002/promotions", f"{PREFIX}/S001/promotions")
        got = s001.received_until(f"{PREFIX}/S001/promotions")
        assert got == [(f"{PREFIX}/S001/promotions", b'{"store_id": "S001", "version": 1}')]

        # A store's own events are not readable back by another store (nor by itself).
        s002.subscribe(f"{PREFIX}/#", f"{PREFIX}/S002/promotions")
        s001.publish(f"{PREFIX}/S001/pos/T1/events", '{"store_id": "S001"}')
        got = s002.received_until(f"{PREFIX}/S002/promotions")
        assert [topic for topic, _ in got] == [f"{PREFIX}/S002/promotions"]
        assert s001.messages.empty()
    finally:
        s001.close()
        s002.close()


def test_nobody_connects_without_the_right_password(broker: Broker) -> None:
    attempts = {
        "anonymous": Client(broker, None, name="anonymous"),
        "wrong password": Client(broker, "S001", "not-the-password", name="wrong"),
        "unknown user": Client(broker, "S999", "whatever", name="unknown"),
    }
    try:
        for what, client in attempts.items():
            assert not client.accepted, f"{what} was let in"
        ok = Client(broker, "S002")
        assert ok.accepted
        ok.close()
    finally:
        for client in attempts.values():
            client.close()


def test_make_store_users_keeps_existing_users_and_rejects_bad_ids(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        unavailable("mosquitto_passwd is not installed (apt-get install mosquitto)")
    passwd = tmp_path / "passwd"
    first = make_users(passwd, "S001")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("S001\t")
    before = passwd.read_text()
    assert oct(passwd.stat().st_mode & 0o777) == "0o600"

    again = make_users(passwd, "S001", "S003")
    assert again.returncode == 0, again.stderr
    assert [line.split("\t")[0] for line in again.stdout.splitlines()] == ["S003"]
    assert passwd.read_text().startswith(before)

    for bad in ("S/1", "S+", "#", "storepulse-ingest", ""):
        refused = make_users(passwd, bad)
        assert refused.returncode == 2, bad
    assert [line.split(":")[0] for line in passwd.read_text().splitlines()] == ["S001", "S003"]
