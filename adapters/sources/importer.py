"""The importer service: an adapter's events into StorePulse, locally or on a remote server.

An adapter turns input into a `Conversion` (events and a report) and never touches the
database. This module delivers those events:

- `LocalDestination`: through `ingest.service.ingest_payloads`, in chunks, each chunk one
  `session_scope` transaction (rejected events become dead letters in the same transaction);
- `HttpDestination`: `POST {url}/api/v1/events` with a device token, in batches, retrying a 503
  or a connection error with backoff (the server stored nothing then, and event ids make a
  resent batch harmless);
- `MqttDestination`: QoS 1 publishes on the contract's topics, each waited for until the broker's
  PUBACK.

Each delivery adds the per-event outcome (accepted / duplicate / rejected, or sent for MQTT) to
an `ImportOutcome` beside the adapter's report. The mapping context (source ids onto StorePulse
ids, stores' time zones) comes from the database and an optional `--store-map` file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import yaml
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from adapters.sources.base import AdapterContext, Conversion, ImportReport, SourceAdapter, get_adapter
from ingest.db import session_scope
from ingest.gc_tuning import batch_gc_thresholds

log = logging.getLogger(__name__)

LOCAL_CHUNK = 1000
HTTP_BATCH = 500
MQTT_BATCH = 100
MAPPING_KINDS = ("store", "sku", "staff")

# Called with the session of the transaction that stores the last chunk (local) or with None
# once every batch was answered (remote): where a pull saves its watermark.
AfterDelivery = Callable[[Session | None], None]
Progress = Callable[[int, Counter[str]], None]


class ImportFailed(RuntimeError):
    """An import that cannot go on: the message says what and, where known, which event."""


class DeliveryError(ImportFailed):
    pass


class MappingFileError(ImportFailed):
    pass


@dataclass
class ImportOutcome:
    """One input's report and what became of its events."""

    report: ImportReport
    delivery: Counter[str] = field(default_factory=Counter)
    rejections: list[tuple[str | None, str]] = field(default_factory=list)
    error: str | None = None
    dry_run: bool = False

    @property
    def failed(self) -> bool:
        return self.error is not None or self.delivery["rejected"] > 0

    def as_dict(self) -> dict[str, Any]:
        body = self.report.as_dict()
        body["dry_run"] = self.dry_run
        body["events"] = {k: self.delivery.get(k, 0) for k in ("accepted", "duplicate", "rejected", "sent")}
        body["rejected"] = [{"event_id": event_id, "error": error} for event_id, error in self.rejections]
        body["error"] = self.error
        return body


class Destination(Protocol):
    """Where events go. `deliver` returns per-event statuses in input order."""

    label: str

    def deliver(
        self, events: Sequence[dict[str, Any]], *, after: AfterDelivery | None = None, progress: Progress | None = None
    ) -> list[tuple[str | None, str, str | None]]: ...


# Adapters register themselves when their module is imported; these are the ones StorePulse ships.
ADAPTER_MODULES = {
    "poslog": "adapters.sources.poslog",
    "sales": "adapters.sources.sales_table",
    "online_retail": "adapters.sources.online_retail",
}


def adapter_named(name: str, **options: Any) -> SourceAdapter:
    """`get_adapter` after importing the module of a shipped adapter, so it is registered."""
    import importlib

    module = ADAPTER_MODULES.get(name)
    if module is not None:
        importlib.import_module(module)
    return get_adapter(name, **options)


def _chunks(items: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class LocalDestination:
    """Into this StorePulse's database, one transaction per chunk."""

    def __init__(self, engine: Engine, *, source: str, chunk_size: int = LOCAL_CHUNK) -> None:
        self.engine = engine
        self.source = source
        self.chunk_size = chunk_size
        self.label = f"database {engine.url.render_as_string(hide_password=True)}"

    def deliver(
        self, events: Sequence[dict[str, Any]], *, after: AfterDelivery | None = None, progress: Progress | None = None
    ) -> list[tuple[str | None, str, str | None]]:
        from ingest.service import ingest_payloads

        results: list[tuple[str | None, str, str | None]] = []
        counts: Counter[str] = Counter()
        chunks = list(_chunks(events, self.chunk_size)) or [[]]
        # Each chunk's validated events and rows are short-lived: with the batch thresholds they
        # come and go between young collections instead of being walked by dozens of them.
        with batch_gc_thresholds():
            for index, chunk in enumerate(chunks):
                with session_scope(self.engine) as session:
                    stored = ingest_payloads(chunk, session=session, source=self.source) if chunk else []
                    if after is not None and index == len(chunks) - 1:
                        after(session)
                for result in stored:
                    results.append((result.event_id, result.status, result.error))
                    counts[result.status] += 1
                if progress is not None:
                    progress(len(chunk), counts)
        return results


class HttpDestination:
    """`POST {url}/api/v1/events` with a device token, batch by batch."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        batch_size: int = HTTP_BATCH,
        retries: int = 6,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/") + "/api/v1/events"
        self.token = token
        self.batch_size = batch_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.label = self.url

    def _post(self, client: Any, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        import httpx

        first = batch[0].get("event_id") if batch else None
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                response = client.post(self.url, json={"events": list(batch)})
            except httpx.TransportError as exc:
                problem = f"connection: {exc}"
            else:
                if response.status_code == 200:
                    answered: list[dict[str, Any]] = response.json()["results"]
                    if len(answered) != len(batch):
                        raise DeliveryError(
                            f"{self.url}: {len(answered)} results for {len(batch)} events (from {first!r})"
                        )
                    return answered
                if response.status_code != 503 and response.status_code < 500:
                    raise DeliveryError(
                        f"{self.url}: HTTP {response.status_code} for the batch starting with event {first!r}: "
                        f"{_detail(response)}"
                    )
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            if attempt == self.retries:
                raise DeliveryError(
                    f"{self.url}: gave up after {self.retries + 1} attempts on the batch starting with event "
                    f"{first!r} ({problem}); nothing of that batch is known to be stored, send it again"
                )
            log.warning("%s: %s; retrying in %.1f s", self.url, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def deliver(
        self, events: Sequence[dict[str, Any]], *, after: AfterDelivery | None = None, progress: Progress | None = None
    ) -> list[tuple[str | None, str, str | None]]:
        import httpx

        results: list[tuple[str | None, str, str | None]] = []
        counts: Counter[str] = Counter()
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(headers=headers, timeout=self.timeout_s) as client:
            for batch in _chunks(events, self.batch_size):
                for answer in self._post(client, batch):
                    results.append((answer.get("event_id"), answer["status"], answer.get("error")))
                    counts[answer["status"]] += 1
                if progress is not None:
                    progress(len(batch), counts)
        if after is not None:
            after(None)
        return results


def _detail(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return str(response.text)[:300]
    return str(body.get("detail", body) if isinstance(body, dict) else body)[:300]


def event_topic(event: Mapping[str, Any], prefix: str) -> str:
    """The contract's topic for an event: till events per terminal, footfall per sensor, stock per store."""
    store_id = event.get("store_id")
    kind = event.get("type")
    if kind == "footfall":
        return f"{prefix}/{store_id}/footfall/{event.get('sensor_id')}"
    if kind == "stock":
        return f"{prefix}/{store_id}/stock"
    return f"{prefix}/{store_id}/pos/{event.get('terminal_id')}/events"


class MqttDestination:
    """QoS 1 publishes of `{"events": [...]}` per topic, each confirmed by the broker's PUBACK.

    The broker authenticates the store PC: the user name is the URL's (mqtt://S001@host:1883)
    and the password the URL's or the token. The broker gives no per-event answer: events
    count as `sent`; rejected ones land in the server's dead letters.
    """

    def __init__(
        self, url: str, token: str | None, *, topic_prefix: str, batch_size: int = MQTT_BATCH, timeout_s: float = 30.0
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.tls = parts.scheme == "mqtts"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else token
        self.prefix = topic_prefix
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.label = f"mqtt://{self.host}:{self.port}"

    def deliver(
        self, events: Sequence[dict[str, Any]], *, after: AfterDelivery | None = None, progress: Progress | None = None
    ) -> list[tuple[str | None, str, str | None]]:
        import uuid

        import paho.mqtt.client as mqtt

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"storepulse-import-{uuid.uuid4().hex[:12]}", clean_session=True
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set()
        try:
            client.connect(self.host, self.port, keepalive=60)
        except OSError as exc:
            raise DeliveryError(f"{self.label}: cannot connect ({exc})") from None
        client.loop_start()
        results: list[tuple[str | None, str, str | None]] = []
        counts: Counter[str] = Counter()
        try:
            by_topic: dict[str, list[dict[str, Any]]] = {}
            for event in events:
                by_topic.setdefault(event_topic(event, self.prefix), []).append(event)
            for topic, topic_events in by_topic.items():
                for batch in _chunks(topic_events, self.batch_size):
                    first = batch[0].get("event_id")
                    info = client.publish(topic, json.dumps({"events": list(batch)}, ensure_ascii=False), qos=1)
                    try:
                        info.wait_for_publish(timeout=self.timeout_s)
                    except (RuntimeError, ValueError) as exc:
                        raise DeliveryError(
                            f"{self.label}: publish of event {first!r} to {topic} failed ({exc})"
                        ) from None
                    if not info.is_published():
                        raise DeliveryError(
                            f"{self.label}: no PUBACK within {self.timeout_s:.0f} s for the batch starting with "
                            f"event {first!r} on {topic}"
                        )
                    for event in batch:
                        results.append((event.get("event_id"), "sent", None))
                    counts["sent"] += len(batch)
                    if progress is not None:
                        progress(len(batch), counts)
        finally:
            client.disconnect()
            client.loop_stop()
        if after is not None:
            after(None)
        return results


def destination_for(
    to: str | None,
    *,
    token: str | None,
    engine: Engine | None,
    source: str,
    topic_prefix: str = "storepulse/v1",
    chunk_size: int = LOCAL_CHUNK,
) -> Destination:
    """The local database (no `to`), a remote StorePulse over HTTP(S), or a broker (mqtt://, mqtts://)."""
    if not to:
        if engine is None:
            raise ImportFailed("database: no engine to store into")
        return LocalDestination(engine, source=source, chunk_size=chunk_size)
    scheme = urlsplit(to).scheme
    if scheme in ("http", "https"):
        if not token:
            raise ImportFailed("--token: a device token is needed to send to a remote StorePulse over HTTP")
        return HttpDestination(to, token)
    if scheme in ("mqtt", "mqtts"):
        return MqttDestination(to, token, topic_prefix=topic_prefix)
    raise ImportFailed(f"--to: {to!r} is neither an http(s):// nor an mqtt(s):// URL")


def deliver(
    conversion: Conversion,
    destination: Destination | None,
    *,
    after: AfterDelivery | None = None,
    progress: Progress | None = None,
) -> ImportOutcome:
    """Deliver a conversion's events (none when `destination` is None: a dry run) and report the outcome."""
    outcome = ImportOutcome(conversion.report, dry_run=destination is None)
    if destination is None:
        return outcome
    try:
        results = destination.deliver(conversion.events, after=after, progress=progress)
    except DeliveryError as exc:
        outcome.error = str(exc)
        return outcome
    for event_id, status, error in results:
        outcome.delivery[status] += 1
        if status == "rejected":
            outcome.rejections.append((event_id, error or "rejected"))
    return outcome


# --- the mapping context ------------------------------------------------------------------------


def load_context(
    *, session: Session | None, source: str, store_map: Path | None = None, default_zone: str = "Asia/Shanghai"
) -> AdapterContext:
    """Mappings of `source` (its own rows over `*` rows) and the stores' zones, then the --store-map file on top."""
    mappings: dict[str, dict[str, str]] = {kind: {} for kind in MAPPING_KINDS}
    zones: dict[str, str] = {}
    if session is not None:
        mappings, zones = _database_context(session, source)
    if store_map is not None:
        for kind, pairs in read_mapping_file(store_map).items():
            mappings.setdefault(kind, {}).update(pairs)
    return AdapterContext(mappings=mappings, store_zones=zones, default_zone=default_zone)


def _database_context(session: Session, source: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    import importlib

    try:  # the shared loader of issue 13, when it is there
        shared_loader: Any = importlib.import_module("adapters.sources.mappings")
    except ImportError:
        shared_loader = None
    loader = getattr(shared_loader, "load_context", None)
    if loader is not None:
        try:
            context = loader(session=session, source=source)
            return {k: dict(v) for k, v in context.mappings.items()}, dict(context.store_zones)
        except TypeError:
            pass  # another signature: fall back to reading the tables here
    from ingest.models import SourceMapping, Store

    mappings: dict[str, dict[str, str]] = {kind: {} for kind in MAPPING_KINDS}
    rows = session.execute(
        select(SourceMapping.kind, SourceMapping.source, SourceMapping.external_id, SourceMapping.target_id).where(
            SourceMapping.source.in_([source, source.split(":")[0], "*"])
        )
    ).all()
    # Most specific source last, so it wins: '*' < 'poslog' < 'poslog:ncr_acs'.
    for kind, _src, external_id, target_id in sorted(rows, key=lambda r: (r[1] != "*", len(r[1]))):
        mappings.setdefault(kind, {})[external_id] = target_id
    zones = {store_id: zone for store_id, zone in session.execute(select(Store.store_id, Store.timezone))}
    return mappings, zones


def read_mapping_file(path: Path) -> dict[str, dict[str, str]]:
    """A --store-map file: CSV `external_id,store_id` or `kind,external_id,target_id`, or YAML.

    YAML is either `{external_id: store_id}` or `{store: {...}, sku: {...}, staff: {...}}`.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MappingFileError(f"--store-map: cannot read {path} ({exc.strerror})") from None
    result: dict[str, dict[str, str]] = {kind: {} for kind in MAPPING_KINDS}
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise MappingFileError(f"--store-map: {path} is not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise MappingFileError(f"--store-map: {path}: expected a mapping of source ids to store ids")
        if set(map(str, data)) <= set(MAPPING_KINDS) and all(isinstance(v, dict) for v in data.values()):
            for kind, pairs in data.items():
                result[str(kind)].update({str(k).strip(): str(v).strip() for k, v in pairs.items()})
        else:
            result["store"].update({str(k).strip(): str(v).strip() for k, v in data.items()})
        return result
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return result
    header = [cell.strip().lower() for cell in rows[0]]
    if header[:3] == ["kind", "external_id", "target_id"]:
        for number, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < 3 or row[0].strip() not in MAPPING_KINDS or not row[1].strip() or not row[2].strip():
                raise MappingFileError(
                    f"--store-map: {path} line {number}: expected kind (store, sku or staff), external_id, target_id"
                )
            result[row[0].strip()][row[1].strip()] = row[2].strip()
        return result
    if header[:2] != ["external_id", "store_id"]:
        raise MappingFileError(
            f"--store-map: {path}: the first line must be 'external_id,store_id' or 'kind,external_id,target_id'"
        )
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise MappingFileError(f"--store-map: {path} line {number}: expected external_id,store_id")
        result["store"][row[0].strip()] = row[1].strip()
    return result


def context_from_database(
    engine: Engine | None, *, source: str, store_map: Path | None, default_zone: str
) -> AdapterContext:
    """`load_context` on `engine`; a store PC without a StorePulse schema gets the file's mappings only."""
    if engine is None:
        return load_context(session=None, source=source, store_map=store_map, default_zone=default_zone)
    try:
        with session_scope(engine) as session:
            return load_context(session=session, source=source, store_map=store_map, default_zone=default_zone)
    except SQLAlchemyError as exc:
        log.warning("mappings: no StorePulse schema at %s (%s); using --store-map only", engine.url, exc)
        return load_context(session=None, source=source, store_map=store_map, default_zone=default_zone)


def report_lines(outcome: ImportOutcome, *, max_items: int = 50) -> list[str]:
    """The report as an operator reads it: counts, skipped items with where and why, findings, rejections."""
    report = outcome.report
    title = report.file or report.source
    lines = [f"{title} ({report.source})" + (" [dry run: nothing stored or sent]" if outcome.dry_run else "")]
    if report.counts:
        lines.append("  counts: " + ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items())))
    if report.totals:
        lines.append("  totals: " + ", ".join(f"{k} {v}" for k, v in sorted(report.totals.items())))
    if not outcome.dry_run:
        events = ", ".join(f"{k} {outcome.delivery[k]}" for k in ("accepted", "duplicate", "rejected", "sent") if
                           outcome.delivery[k] or k != "sent")  # fmt: skip
        lines.append(f"  events: {events}")
    for heading, items in (
        ("skipped", [str(s) for s in report.skipped]),
        ("findings", list(report.findings)),
        ("rejected", [f"{event_id}: {error}" for event_id, error in outcome.rejections]),
    ):
        if items:
            lines.append(f"  {heading} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:max_items])
            if len(items) > max_items:
                lines.append(f"    ... and {len(items) - max_items} more (see the JSON report)")
    if outcome.error:
        lines.append(f"  error: {outcome.error}")
    return lines
