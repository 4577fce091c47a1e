"""The MQTT ingest worker: QoS 1, persistent session, acknowledge only after commit.

At-least-once delivery plus idempotent writes gives exactly-once storage: a message is
acknowledged (PUBACK) only once the transaction holding its events has committed, so a crash
or a database outage makes the broker redeliver it, and the (event_id, occurred_at) key turns
the redelivery into a duplicate.

Failures are told apart by `ingest.errors.classify`: a message whose failure is a data error is
dead-lettered with its reason; on an environment error (missing table, column or privilege,
statement timeout, full disk, unreachable database, anything unknown) the worker keeps the
batch unacknowledged, retries with capped, jittered backoff, logs an ERROR with the reason at
least once a minute and reports "failing" on its health endpoint until a commit succeeds.
"""

from __future__ import annotations

import logging
import queue
import random
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

from ingest.db import session_scope
from ingest.errors import Diagnosis, classify
from ingest.gc_tuning import batch_gc_thresholds, freeze_startup_objects
from ingest.health import WorkerHealth, iso, schema_problem, serve_worker_health
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


# While storing fails, the ERROR with the reason repeats at this interval (and whenever the
# reason changes), not at every retry.
ERROR_LOG_EVERY_S = 60.0
RETRY_FIRST_DELAY_S = 0.5


def retry_delay(attempt: int, cap_s: float) -> float:
    """Exponential backoff from RETRY_FIRST_DELAY_S, capped, with jitter so that workers
    sharing a subscription do not hit a recovering database in lockstep."""
    ceiling = min(cap_s, RETRY_FIRST_DELAY_S * 2 ** min(attempt - 1, 30))
    return random.uniform(ceiling / 2, ceiling)


class WorkerStartError(RuntimeError):
    """The worker cannot start as configured; the message names the setting."""


@dataclass
class Outage:
    """The storing failure of the batch in hand: since when, how often tried, and when last told."""

    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    reason: str = ""
    logged_at: float | None = None

    def should_log(self, reason: str) -> bool:
        now = time.monotonic()
        if self.logged_at is None or reason != self.reason or now - self.logged_at >= ERROR_LOG_EVERY_S:
            self.logged_at = now
            return True
        return False


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
        self.health = WorkerHealth()
        self.health_address: tuple[str, int] | None = None
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

    def _store_batch(self, decoded: list[Decoded]) -> tuple[int, int, int]:
        """The batch in one transaction; if a data error breaks it, message by message."""
        try:
            return self._store(decoded)
        except Exception as exc:
            if not classify(exc).is_data:
                raise
        return self._store_isolating(decoded)

    def _store_isolating(self, decoded: list[Decoded]) -> tuple[int, int, int]:
        """Store message by message, so one poison message cannot stall the stream.

        Only a message whose own failure is a data error is dead-lettered; an environment error
        propagates, and the whole batch stays unacknowledged (what was committed here becomes
        duplicates on the retry).
        """
        totals = [0, 0, 0]
        for d in decoded:
            try:
                counts = self._store([d])
            except Exception as exc:
                diagnosis = classify(exc)
                if not diagnosis.is_data:
                    raise
                log.warning("message on %s refused by the database (%s); dead-lettering it",
                            d.message.topic, diagnosis.reason)  # fmt: skip
                with session_scope(self.engine) as session:
                    dead_letter(
                        session=session,
                        source=f"mqtt:{d.message.topic}",
                        reason=f"database: {diagnosis.reason}",
                        raw_payload=d.message.payload.decode("utf-8", errors="replace"),
                    )
                counts = (0, 1, 0)
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
        return totals[0], totals[1], totals[2]

    def _write_with_retry(self, batch: list[Received]) -> bool:
        """Commit the batch, retrying through environment errors; False if stopped before commit."""
        decoded = [decode(m, self.settings.mqtt_topic_prefix) for m in batch]
        outage: Outage | None = None
        while True:
            try:
                counts = self._store_batch(decoded)
                break
            except Exception as exc:
                outage = outage or Outage()
                outage.attempts += 1
                diagnosis = classify(exc)
                self.health.failing(diagnosis.reason, kept_messages=len(batch))
                delay = retry_delay(outage.attempts, self.settings.ingest_retry_max_s)
                self._report_outage(outage, diagnosis, exc, len(batch), delay)
                if self.stopping.is_set() or self.stopping.wait(delay):
                    log.warning(
                        "stopping while the database is unusable (%s); %d messages stay unacknowledged "
                        "and will be redelivered", diagnosis.reason, len(batch),
                    )  # fmt: skip
                    return False
        if outage is not None:
            log.warning(
                "database usable again after %.0f s and %d failed attempts; the kept batch of %d messages is stored",
                time.monotonic() - outage.started, outage.attempts, len(batch),
            )  # fmt: skip
        self.health.stored()
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

    @staticmethod
    def _report_outage(outage: Outage, diagnosis: Diagnosis, exc: Exception, kept: int, delay: float) -> None:
        if outage.should_log(diagnosis.reason):
            log.error(
                "database unavailable: %s; %d messages kept unacknowledged (nothing dead-lettered), "
                "failing for %.0f s, %d attempts, next retry in %.1f s",
                diagnosis.reason, kept, time.monotonic() - outage.started, outage.attempts, delay,
                # An error that is not the database's own deserves its traceback, once.
                exc_info=exc if diagnosis.reason.startswith("internal error") and outage.attempts == 1 else None,
            )  # fmt: skip
        outage.reason = diagnosis.reason
        log.debug("retry %d in %.1f s after: %s", outage.attempts, delay, diagnosis.reason)

    def health_report(self) -> tuple[int, dict[str, Any]]:
        """The health endpoint's answer: 200 while the worker stores, 503 with the reason otherwise."""
        failure = self.health.report()
        problem = schema_problem(self.engine)
        if failure is not None:
            # The database's own words rarely name the table; the schema check does.
            if problem is not None:
                failure["schema"] = problem
            return 503, failure
        if not self.connected.is_set():
            return 503, {"status": "failing", "reason": f"broker: not connected to {self._host}:{self._port}"}
        if problem is not None:
            return 503, {"status": "failing", "reason": problem}
        return 200, {
            "status": "ok",
            "broker": f"{self._host}:{self._port}",
            "last_commit_at": iso(self.health.last_commit_at),
            "events_stored": self.total_events,
        }

    def _start_health_server(self) -> Callable[[], None]:
        port = self.settings.ingest_health_port
        if port is None:
            return lambda: None
        host = self.settings.ingest_health_host
        try:
            server, thread = serve_worker_health(host, port, self.health_report)
        except OSError as exc:
            raise WorkerStartError(f"ingest_health_port: cannot listen on {host}:{port} ({exc})") from exc
        self.health_address = (host, int(server.server_address[1]))
        log.info("health endpoint on http://%s:%d/healthz", *self.health_address)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return stop

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
        stop_health = self._start_health_server()
        self.client.connect_async(
            self._host, self._port, keepalive=30, clean_start=False, properties=self._connect_properties()
        )
        self.client.loop_start()
        # Start-up objects live as long as the worker: frozen, collections no longer walk them; and
        # each batch's short-lived events come and go between young collections (ingest/gc_tuning.py).
        freeze_startup_objects()
        try:
            with batch_gc_thresholds():
                while not self.stopping.is_set():
                    batch = self._collect()
                    if batch:
                        self._write_with_retry(batch)
                    self._log_stats()
        finally:
            self._log_stats(force=True)
            self.client.disconnect()
            self.client.loop_stop()
            stop_health()
            log.info("ingest worker stopped; %d events stored in this run", self.total_events)

    def run_forever(self) -> int:
        """Run with SIGTERM / SIGINT stopping cleanly; returns the process exit code."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, finishing the current batch", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        return self.run_reporting()

    def run_reporting(self) -> int:
        """`run`, and the process exit code: 0 when stopped, non-zero with the cause logged otherwise."""
        try:
            self.run()
        except WorkerStartError as exc:
            log.critical("ingest worker cannot start: %s", exc)
            return 2
        except Exception as exc:
            # Whatever was not acknowledged is redelivered to the next worker; the supervisor
            # (systemd, Docker) restarts this one on the non-zero exit code.
            log.critical(
                "ingest worker exits on an unexpected error: %s; unacknowledged messages will be redelivered",
                classify(exc).reason, exc_info=exc,
            )  # fmt: skip
            return 1
        return 0
