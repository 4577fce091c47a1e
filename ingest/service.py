"""Ingest services: validate payloads, store accepted events, dead-letter the rest.

The HTTP API, the MQTT worker, the simulator and the importers all call `ingest_payloads`
with a session from `ingest.db.session_scope`; none of them commits on its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ingest.contract import ContractError, Event, parse_event
from ingest.hooks import run_accepted_hooks
from ingest.models import DeadLetter, PromotionAck, Store
from ingest.writers import BatchRefused, get_writer

log = logging.getLogger(__name__)

Status = Literal["accepted", "duplicate", "rejected"]


@dataclass(frozen=True)
class EventResult:
    event_id: str | None
    status: Status
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "status": self.status, "error": self.error}


def _raw_text(payload: Any) -> str:
    try:
        return json.dumps(payload, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(payload)


def _text_field(payload: Any, name: str) -> str | None:
    value = payload.get(name) if isinstance(payload, dict) else None
    return str(value)[:200] if value is not None else None


def storable_text(text: str) -> str:
    """Text any database accepts: NUL and unpaired surrogates become visible escapes."""
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter(
    *,
    session: Session,
    source: str,
    reason: str,
    raw_payload: str,
    event_id: str | None = None,
    store_id: str | None = None,
    received_at: datetime | None = None,
) -> None:
    """Keep a rejected payload with its reason; a redelivered identical payload is stored once."""
    raw_payload = storable_text(raw_payload)
    source = storable_text(source)[:200]
    row = {
        "received_at": received_at or datetime.now(UTC),
        "source": source,
        "reason": storable_text(reason),
        "raw_payload": raw_payload,
        "payload_sha256": hashlib.sha256(f"{source}\n{raw_payload}".encode()).hexdigest(),
        "event_id": storable_text(event_id) if event_id else None,
        "store_id": storable_text(store_id) if store_id else None,
    }
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert_fn(DeadLetter).values(row).on_conflict_do_nothing())


class AckError(ValueError):
    """A promotion acknowledgement that cannot be recorded; the message names the field."""


def parse_ack(body: Any) -> int:
    """The promotions version of an ack payload `{"promotions_version": N}`."""
    if not isinstance(body, dict):
        raise AckError('payload: expected an object {"promotions_version": N}')
    version = body.get("promotions_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AckError(f"promotions_version: expected a positive integer, got {version!r}")
    return version


def record_promotion_ack(
    *, session: Session, store_id: str, terminal_id: str, version: int, source: str, at: datetime | None = None
) -> bool:
    """Record that a till applied a promotion-set version; False when it was already recorded."""
    if not terminal_id or len(terminal_id) > 64:
        raise AckError("terminal_id: expected 1 to 64 characters")
    if session.get(Store, store_id) is None:
        raise AckError(f"store_id: unknown store {store_id!r}")
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert_fn(PromotionAck)
        .values(
            store_id=store_id, terminal_id=terminal_id, promotions_version=version,
            acked_at=at or datetime.now(UTC), source=storable_text(source)[:200],
        )
        .on_conflict_do_nothing()
        .returning(PromotionAck.terminal_id)
    )  # fmt: skip
    return session.execute(statement).first() is not None


def known_store_ids(*, session: Session) -> set[str]:
    return set(session.scalars(select(Store.store_id)))


@dataclass(frozen=True)
class Inbound:
    """One decoded payload and what its transport says about it."""

    payload: Any
    source: str
    topic_store_id: str | None = None
    topic_kind: str | None = None
    allowed_types: frozenset[str] | None = None


def _transport_error(event: Event, item: Inbound, allowed_store_id: str | None) -> str | None:
    if item.topic_store_id is not None and event.store_id != item.topic_store_id:
        return f"store_id: payload store {event.store_id!r} does not match topic store {item.topic_store_id!r}"
    if allowed_store_id is not None and event.store_id != allowed_store_id:
        return f"store_id: this device token publishes for store {allowed_store_id!r} only"
    if item.allowed_types is not None and event.type not in item.allowed_types:
        return f"type: {event.type!r} events are not accepted on the {item.topic_kind} topic"
    return None


def ingest_payloads(
    payloads: Sequence[Any],
    *,
    session: Session,
    source: str,
    allowed_store_id: str | None = None,
    now: datetime | None = None,
) -> list[EventResult]:
    """Validate and store a batch of decoded JSON events; one result per payload, in order.

    ``allowed_store_id`` is the store of the HTTP device token: events for any other store are
    rejected. Transient database errors propagate so the caller can retry the whole batch.
    """
    return ingest_inbound(
        [Inbound(p, source) for p in payloads], session=session, allowed_store_id=allowed_store_id, now=now
    )


def ingest_inbound(
    items: Sequence[Inbound],
    *,
    session: Session,
    allowed_store_id: str | None = None,
    now: datetime | None = None,
) -> list[EventResult]:
    """`ingest_payloads` for payloads from several transports or topics at once (the MQTT worker)."""
    received_at = datetime.now(UTC)
    stores = known_store_ids(session=session)
    results: list[EventResult | None] = [None] * len(items)
    valid_positions: list[int] = []
    valid_events: list[Event] = []
    valid_raws: list[dict[str, Any]] = []
    rejected: list[tuple[int, str]] = []

    for position, item in enumerate(items):
        try:
            event = parse_event(item.payload, now=now)
        except ContractError as exc:
            rejected.append((position, str(exc)))
            continue
        error = (
            f"store_id: unknown store {event.store_id!r}"
            if event.store_id not in stores
            else _transport_error(event, item, allowed_store_id)
        )
        if error:
            rejected.append((position, error))
            continue
        valid_positions.append(position)
        valid_events.append(event)
        valid_raws.append(item.payload)

    if valid_events:
        accepted: list[Event] = []
        event_at = dict(zip(valid_positions, valid_events, strict=True))
        for position, status, error in _write(valid_events, valid_raws, valid_positions, session, received_at):
            if error is not None:
                rejected.append((position, error))
            else:
                results[position] = EventResult(_text_field(items[position].payload, "event_id"), status)
                if status == "accepted":
                    accepted.append(event_at[position])
        run_accepted_hooks(session, accepted)

    for position, reason in rejected:
        payload = items[position].payload
        dead_letter(
            session=session,
            source=items[position].source,
            reason=reason,
            raw_payload=_raw_text(payload),
            event_id=_text_field(payload, "event_id"),
            store_id=_text_field(payload, "store_id"),
            received_at=received_at,
        )
        results[position] = EventResult(_text_field(payload, "event_id"), "rejected", reason)
    return [result for result in results if result is not None]


def _write(
    events: list[Event],
    raws: list[dict[str, Any]],
    positions: list[int],
    session: Session,
    received_at: datetime,
) -> list[tuple[int, Status, str | None]]:
    writer = get_writer(session.get_bind().dialect.name)
    try:
        with session.begin_nested():
            statuses = writer.write(events, raws, session=session, received_at=received_at)
        return [(p, s, None) for p, s in zip(positions, statuses, strict=True)]
    except BatchRefused as exc:
        # A value the contract let through but the database refuses: find the culprit
        # event by event instead of losing the batch.
        log.warning("batch of %d refused by the database (%s); retrying event by event", len(events), exc)
    outcome: list[tuple[int, Status, str | None]] = []
    for event, raw, position in zip(events, raws, positions, strict=True):
        try:
            with session.begin_nested():
                (status,) = writer.write([event], [raw], session=session, received_at=received_at)
            outcome.append((position, status, None))
        except BatchRefused as exc:
            outcome.append((position, "rejected", f"database: {exc}"))
    return outcome
