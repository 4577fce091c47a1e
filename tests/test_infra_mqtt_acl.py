"""The production broker config and ACL, enforced by a real Mosquitto.

A throwaway Mosquitto is started on a free port of 127.0.0.1 with infra/mosquitto/mosquitto.conf
(container paths rewritten to a temporary folder), infra/mosquitto/acl, infra/mosquitto/tuning.conf
and a password file made by infra/mosquitto/make-store-users. The checks are the ones the ACL
exists for: a store publishes only under its own topics (Mosquitto drops a denied publish without
telling an MQTT 3.1.1 publisher, so we look at what subscribers receive), reads only its own
promotions, and nobody connects without a password. Missing Mosquitto is a skip on a laptop and a
failure in CI.
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

from tests.conftest import free_port, port_open, unavailable

MOSQUITTO = Path("/usr/sbin/mosquitto")
INFRA = Path(__file__).resolve().parents[1] / "infra" / "mosquitto"
PREFIX = "storepulse/v1"
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Broker:
    port: int
    passwords: dict[str, str]
    log: Path


def broker_config(tmp: Path, port: int) -> str:
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
    conf.write_text(broker_config(tmp, port))
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
    """A small synchronous wrapper around a paho client.

    Store devices speak MQTT 3.1.1 here, as most tills do. Mosquitto 2.0 acknowledges a denied
    QoS 1 publish (MQTT 3.1.1: a plain PUBACK; MQTT 5: PUBACK reason 0x87 "not authorized"),
    never forwards it, and then drops the client's connection.
    """

    def __init__(
        self,
        broker: Broker,
        user: str | None,
        password: str | None = None,
        *,
        name: str = "",
        protocol: mqtt.MQTTProtocolVersion | None = None,
    ) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self.connack: Any = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._granted: list[Any] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acl-test-{name or user}-{secrets.token_hex(3)}",
            protocol=protocol or (mqtt.MQTTv5 if user == "storepulse-ingest" else mqtt.MQTTv311),
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
        self._granted = [getattr(code, "value", code) for code in reason_codes]
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Message(message.topic, bytes(message.payload), bool(message.retain)))

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def subscribe(self, *topics: str) -> list[Any]:
        self._subscribed.clear()
        self.client.subscribe([(topic, 1) for topic in topics])
        assert self._subscribed.wait(TIMEOUT_S), "no SUBACK"
        return self._granted

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published()

    def received_until(self, marker_topic: str) -> list[Message]:
        """Everything received up to and including the first message on `marker_topic`."""
        got: list[Message] = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"nothing on {marker_topic} within {TIMEOUT_S}s; got {got}")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            got.append(message)
            if message.topic == marker_topic:
                # Anything still in flight from earlier publishes would arrive before the
                # marker (same publisher, same QoS); give stragglers a moment all the same.
                time.sleep(0.3)
                while not self.messages.empty():
                    got.append(self.messages.get_nowait())
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_denied(broker: Broker, user: str, topic: str, payload: str) -> None:
    """Publish from a connection of its own, driven by hand: Mosquitto closes it after a denied
    publish, and paho's background loop would wait a second before reconnecting."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"acl-test-{user}-denied-{secrets.token_hex(3)}",
        protocol=mqtt.MQTTv311,
    )
    client.username_pw_set(user, broker.passwords[user])
    client.connect("127.0.0.1", broker.port, keepalive=30)
    deadline = time.monotonic() + TIMEOUT_S
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    assert client.is_connected(), f"{user} could not connect"
    info = client.publish(topic, payload, qos=1)
    while not info.is_published() and client.is_connected() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()


def test_store_publishes_only_under_its_own_store(broker: Broker) -> None:
    ingest = Client(broker, "storepulse-ingest", name="plain")
    shared = Client(broker, "storepulse-ingest", name="shared")
    s001 = Client(broker, "S001")
    try:
        assert ingest.subscribe(f"{PREFIX}/#") == [1]
        assert shared.subscribe(f"$share/storepulse/{PREFIX}/+/pos/+/events") == [1]

        publish_denied(broker, "S001", f"{PREFIX}/S002/pos/T1/events", '{"store_id": "S002", "spoofed": true}')
        publish_denied(broker, "S001", f"{PREFIX}/S002/footfall/door-1", '{"spoofed": true}')
        publish_denied(broker, "S001", f"{PREFIX}/S002/stock", '{"spoofed": true}')
        publish_denied(broker, "S001", f"{PREFIX}/S001/promotions", '{"version": 999, "spoofed": true}')
        publish_denied(broker, "S001", f"{PREFIX}/S001/anything-else", '{"spoofed": true}')
        s001.publish(f"{PREFIX}/S001/footfall/door-1", '{"store_id": "S001"}')
        s001.publish(f"{PREFIX}/S001/stock", '{"store_id": "S001"}')
        s001.publish(f"{PREFIX}/S001/pos/T1/ack", '{"promotions_version": 1}')
        s001.publish(f"{PREFIX}/S001/pos/T1/events", '{"store_id": "S001"}')

        # (retained promotions left by another test are not what this test is about)
        got = ingest.received_until(f"{PREFIX}/S001/pos/T1/events")
        plain_topics = [m.topic for m in got if not m.retain]
        assert plain_topics == [
            f"{PREFIX}/S001/footfall/door-1",
            f"{PREFIX}/S001/stock",
            f"{PREFIX}/S001/pos/T1/ack",
            f"{PREFIX}/S001/pos/T1/events",
        ]
        shared_topics = [m.topic for m in shared.received_until(f"{PREFIX}/S001/pos/T1/events")]
        assert shared_topics == [f"{PREFIX}/S001/pos/T1/events"]
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
        # (overlapping subscriptions may each deliver the retained message: compare sets)
        got = s001.received_until(f"{PREFIX}/S001/promotions")
        assert {(m.topic, m.payload) for m in got} == {
            (f"{PREFIX}/S001/promotions", b'{"store_id": "S001", "version": 1}')
        }

        # A store's own events are not readable back by another store (nor by itself).
        s002.subscribe(f"{PREFIX}/#", f"{PREFIX}/S002/promotions")
        s001.publish(f"{PREFIX}/S001/pos/T1/events", '{"store_id": "S001"}')
        got = s002.received_until(f"{PREFIX}/S002/promotions")
        assert {m.topic for m in got} == {f"{PREFIX}/S002/promotions"}
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
