"""The MQTT ingest worker: QoS 1, persistent session, acknowledge only after commit.

At-least-once delivery plus idempotent writes gives exactly-once storage: a message is
acknowledged (PUBACK) only once the transaction holding its events has committed, so a crash
or a database outage makes the broker redeliver it, and the (event_id, occurred_at) key turns
the redelivery into a duplicate.
"""

from __future__ import annotations

import logging
import queue
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from ingest.db import session_scope
from ingest.service import AckError, Inbound, dead_letter, ingest_inbound, parse_ack, record_promotion_ack
from ingest.settings import Settings

log = logging.getLogger(__name__)

POS_TYPES = frozenset({"receipt", "consultation_step", "prompt_answer"})
TOPIC_TYPES: dict[str, frozenset[str]] = {
    "pos": POS_TYPES,
    "footfall": frozenset({"footfall"}),
    "stock": frozenset({"stock"}),
}


def subscriptions(prefix: str, shared_group: str | None) -> list[str]:
    topics = [f"{prefix}/+/pos/+/events", f"{prefix}/+/pos/+/ack", f"{prefix}/+/footfall/+", f"{prefix}/+/stock"]
    if shared_group:
        topics = [f"$share/{shared_group}/{topic}" for topic in topics]
    return topics


def parse_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(store_id, topic kind) of an event or ack topic, or None for anything else."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) == 4 and parts[1] == "pos" and parts[3] in ("events", "ack") and parts[0] and parts[2]:
        return parts[0], "pos" if parts[3] == "events" else "ack"
    if len(parts) == 3 and parts[1] == "footfall" and parts[0] and parts[2]:
        return parts[0], "footfall"
    if len(parts) == 2 and parts[1] == "stock" and parts[0]:
        return parts[0], "stock"
    return None


@dataclass
class Received:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    arrived: float


@dataclass(frozen=True)
class TillAck:
    """A till's `{"promotions_version": N}` on `.../pos/{terminal_id}/ack`."""

    store_id: str
    terminal_id: str
    version: int


@dataclass
class Decoded:
    """A message turned into contract payloads (or an ack), or into a dead letter when it is neither."""

    message: Received
    items: list[Inbound] = field(default_factory=list)
    dead_reason: str | None = None
    ack: TillAck | None = None


def decode(message: Received, prefix: str) -> Decoded:
    topic = parse_topic(prefix, message.topic)
    if topic is None:
        return Decoded(message, dead_reason=f"topic: {message.topic!r} is not a StorePulse event topic")
    store_id, kind = topic
    try:
        body = orjson.loads(message.payload)
    except orjson.JSONDecodeError as exc:
        return Decoded(message, dead_reason=f"payload: not valid JSON ({exc})")
    if kind == "ack":
        try:
            version = parse_ack(body)
        except AckError as exc:
            return Decoded(message, dead_reason=str(exc))
        return Decoded(message, ack=TillAck(store_id, message.topic.split("/")[-2], version))
    if isinstance(body, dict) and "events" in body and "type" not in body:
        events = body["events"]
        if not isinstance(events, list):
            return Decoded(message, dead_reason="events: must be a list of events")
    else:
        events = [body]
    source = f"mqtt:{message.topic}"
    allowed = TOPIC_TYPES[kind]
    return Decoded(message, [Inbound(e, source, store_id, kind, allowed) for e in events])


def event_time_lag(decoded: list[Decoded]) -> float | None:
    """Seconds between now and the event time of the batch's last event: how far behind the stream we are."""
    for d in reversed(decoded):
        for item in reversed(d.items):
            occurred = item.payload.get("occurred_at") if isinstance(item.payload, dict) else None
            try:
                moment = datetime.fromisoformat(occurred) if isinstance(occurred, str) else None
            except ValueError:
                continue
            if moment is not None and moment.tzinfo is not None:
                return (datetime.now(UTC) - moment).total_seconds()
    return None


def is_transient(exc: BaseException) -> bool:
    """Connection-level trouble: keep the batch unacknowledged and retry later."""
    if isinstance(exc, sa_exc.DBAPIError):
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or exc.connection_invalidated
    return isinstance(exc, sa_exc.TimeoutError | ConnectionError)


@dataclass
class Stats:
    events: int = 0
    messages: int = 0
    batches: int = 0
    rejected: int = 0
    duplicates: int = 0
    lags_ms: list[float] = field(default_factory=list)
    event_lag_s: float | None = None
    since: float = field(default_factory=time.monotonic)


class IngestWorker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        stats_every_s: float = 10.0,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        if not settings.mqtt_url:
            raise ValueError("mqtt_url: required for the ingest worker")
        self.settings = settings
        self.engine = engine
        self.stats_every_s = stats_every_s
        self.on_commit = on_commit
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._generation = 0
        self._stats = Stats()
        self.total_events = 0
        self.client = self._make_client()

    # --- MQTT side (paho's network thread) -------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        url = urlsplit(self.settings.mqtt_url or "")
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.settings.mqtt_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if url.username:
            client.username_pw_set(unquote(url.username), unquote(url.password) if url.password else None)
        if url.scheme in ("mqtts", "ssl"):
            client.tls_set()
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._host, self._port = url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)
        return client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.mqtt_session_expiry_s
        # The broker sends at most this many unacknowledged messages: it bounds the worker's
        # memory while the database is down and nothing gets acknowledged.
        properties.ReceiveMaximum = self.settings.mqtt_receive_maximum
        return properties

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        topics = subscriptions(self.settings.mqtt_topic_prefix, self.settings.mqtt_shared_group)
        client.subscribe([(topic, 1) for topic in topics])
        log.info(
            "connected to %s:%s as %s (session present: %s), subscribed to %s",
            self._host, self._port, self.settings.mqtt_client_id, flags.session_present, ", ".join(topics),
        )  # fmt: skip
        self.connected.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        # Packet ids of the old connection mean nothing on the next one: the broker will
        # redeliver what was not acknowledged, so pending acks of this generation are dropped.
        self._generation += 1
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("disconnected from broker (%s); paho reconnects with backoff", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(
            Received(
                self._generation, message.mid, message.qos, message.topic, bytes(message.payload), time.monotonic()
            )
        )

    # --- batching and writing (the worker's main thread) ------------------------------------

    def _collect(self) -> list[Received]:
        try:
            first = self._inbox.get(timeout=0.25)
        except queue.Empty:
            return []
        batch = [first]
        # The window runs from the first message's arrival, not from now: messages that queued
        # up while the previous batch was being written must not wait a second window.
        deadline = first.arrived + self.settings.ingest_batch_ms / 1000
        # Messages may carry batches; a rough count of events keeps COPY batches near the target.
        events = max(1, first.payload.count(b'"event_id"'))
        while events < self.settings.ingest_batch_size:
            remaining = deadline - time.monotonic()
            try:
                message = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            batch.append(message)
            events += max(1, message.payload.count(b'"event_id"'))
        return batch

    def _store(self, decoded: list[Decoded]) -> tuple[int, int, int]:
        items = [item for d in decoded for item in d.items]
        with session_scope(self.engine) as session:
            results = ingest_inbound(items, session=session)
            for d in decoded:
                if d.ack is not None:
                    try:
                        record_promotion_ack(
                            session=session, store_id=d.ack.store_id, terminal_id=d.ack.terminal_id,
                            version=d.ack.version, source=f"mqtt:{d.message.topic}",
                        )  # fmt: skip
                    except AckError as exc:
                        d.dead_reason = str(exc)
                if d.dead_reason is not None:
                    dead_letter(
                        session=session,
                        source=f"mqtt:{d.message.topic}",
                        reason=d.dead_reason,
                        raw_payload=d.message.payload.decode("utf-8", errors="replace"),
                    )
        rejected = sum(r.status == "rejected" for r in results) + sum(d.dead_reason is not None for d in decoded)
        duplicates = sum(r.status == "duplicate" for r in results)
        return len(items), rejected, duplicates

    def _store_isolating(self, decoded: list[Decoded]) -> tuple[int, int, int]:
        """Store message by message, so one poison message cannot stall the stream."""
        totals = [0, 0, 0]
        for d in decoded:
            try:
                counts = self._store([d])
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.exception("message on %s broke the ingest path; dead-lettering it", d.message.topic)
                with session_scope(self.engine) as session:
                    dead_letter(
                        session=session,
                        source=f"mqtt:{d.message.topic}",
                        reason=f"worker: internal error {type(exc).__name__}: {exc}",
                        raw_payload=d.message.payload.decode("utf-8", errors="replace"),
                    )
                counts = (0, 1, 0)
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
        return totals[0], totals[1], totals[2]

    def _write_with_retry(self, batch: list[Received]) -> bool:
        """Commit the batch, retrying through database outages; False if stopped before commit."""
        decoded = [decode(m, self.settings.mqtt_topic_prefix) for m in batch]
        delay = 0.5
        while True:
            try:
                try:
                    counts = self._store(decoded)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    counts = self._store_isolating(decoded)
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self.stopping.is_set():
                    log.warning(
                        "stopping while the database is unavailable; %d messages stay unacknowledged", len(batch)
                    )
                    return False
                log.warning(
                    "database unavailable (%s); batch of %d messages kept, retry in %.1fs",
                    str(exc).splitlines()[0][:200],
                    len(batch),
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        events, rejected, duplicates = counts
        committed = time.monotonic()
        for message in batch:
            if message.generation == self._generation:
                self.client.ack(message.mid, message.qos)
        self._stats.events += events
        self._stats.messages += len(batch)
        self._stats.batches += 1
        self._stats.rejected += rejected
        self._stats.duplicates += duplicates
        self._stats.lags_ms.extend((committed - m.arrived) * 1000 for m in batch)
        self._stats.event_lag_s = event_time_lag(decoded)
        self.total_events += events
        if self.on_commit is not None:
            self.on_commit(events)
        return True

    def _log_stats(self, force: bool = False) -> None:
        elapsed = time.monotonic() - self._stats.since
        if elapsed < self.stats_every_s and not force:
            return
        s = self._stats
        if s.messages:
            lags = sorted(s.lags_ms)
            p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            log.info(
                "ingest: %.0f events/s (%d events, %d messages, %d batches, %d rejected, %d duplicate), "
                "receive-to-commit lag p50 %.0f ms p99 %.0f ms, event-time lag %s, inbox %d",
                s.events / elapsed, s.events, s.messages, s.batches, s.rejected, s.duplicates,
                statistics.median(lags), p99,
                "n/a" if s.event_lag_s is None else f"{s.event_lag_s:.1f} s", self._inbox.qsize(),
            )  # fmt: skip
        self._stats = Stats()

    def request_stop(self, *_args: Any) -> None:
        self.stopping.set()

    def run(self) -> None:
        """Consume until `request_stop`; then finish the current batch and disconnect."""
        self.client.connect_async(
            self._host, self._port, keepalive=30, clean_start=False, properties=self._connect_properties()
        )
        self.client.loop_start()
        try:
            while not self.stopping.is_set():
                batch = self._collect()
                if batch:
                    self._write_with_retry(batch)
                self._log_stats()
        finally:
            self._log_stats(force=True)
            self.client.disconnect()
            self.client.loop_stop()
            log.info("ingest worker stopped; %d events stored in this run", self.total_events)

    def run_forever(self) -> int:
        """Run with SIGTERM / SIGINT stopping cleanly; returns the process exit code."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, finishing the current batch", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.run()
        return 0
