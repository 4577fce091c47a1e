"""Dead letters: find them, read them, and replay them through the ingest service.

A replay decodes the stored raw payload as its transport did (an MQTT topic's store and event
types, an HTTP device's store), validates it again against today's master data and stores it
through `ingest_inbound`, so the ingest hooks run as for any event. Each dead letter is replayed
whole inside its own savepoint: either all its events are stored, or nothing is written and the
letter records why. The letter itself is kept, with the outcome:

- accepted or duplicate: `replayed_at` is set and later replays skip it;
- rejected again: `replay_status` is `rejected`, `replay_note` the new reason, `replayed_at` stays
  empty so it can be replayed once the cause is fixed. No second dead letter is written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from ingest import audit
from ingest.models import DeadLetter, DeviceToken
from ingest.mqtt_worker import Received, decode
from ingest.service import AckError, EventResult, Inbound, ingest_inbound, record_promotion_ack
from ingest.settings import get_settings

Outcome = Literal["accepted", "duplicate", "rejected", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("accepted", "duplicate", "rejected", "skipped")
MAX_NOTE_REASONS = 3


class DeadLetterError(ValueError):
    """A request about dead letters that cannot be answered; the message names the field."""


def parse_since(value: str, timezone: ZoneInfo) -> datetime:
    """`2026-12-01` (the start of that day in the chain's time zone) or an ISO time (naive = chain time)."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=timezone)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DeadLetterError(f"since: expected a date YYYY-MM-DD or an ISO time, got {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone)


def _filtered(
    query: Select[Any],
    *,
    reason: str | None,
    source: str | None,
    store_id: str | None,
    since: datetime | None,
    replayed: bool | None,
) -> Select[Any]:
    if reason:
        query = query.where(func.lower(DeadLetter.reason).contains(reason.lower(), autoescape=True))
    if source:
        query = query.where(func.lower(DeadLetter.source).contains(source.lower(), autoescape=True))
    if store_id:
        query = query.where(DeadLetter.store_id == store_id)
    if since is not None:
        query = query.where(DeadLetter.received_at >= since)
    if replayed is True:
        query = query.where(DeadLetter.replayed_at.is_not(None))
    elif replayed is False:
        query = query.where(DeadLetter.replayed_at.is_(None))
    return query


def list_dead_letters(
    *,
    session: Session,
    reason: str | None = None,
    source: str | None = None,
    store_id: str | None = None,
    since: datetime | None = None,
    replayed: bool | None = None,
    limit: int | None = 200,
) -> list[DeadLetter]:
    """Dead letters, newest first; `reason` and `source` match a case-insensitive part of the text."""
    query = select(DeadLetter).order_by(DeadLetter.received_at.desc(), DeadLetter.id.desc())
    query = _filtered(query, reason=reason, source=source, store_id=store_id, since=since, replayed=replayed)
    return list(session.scalars(query.limit(limit) if limit is not None else query))


def count_dead_letters(
    *,
    session: Session,
    reason: str | None = None,
    source: str | None = None,
    store_id: str | None = None,
    since: datetime | None = None,
    replayed: bool | None = None,
) -> int:
    query = _filtered(
        select(func.count()).select_from(DeadLetter),
        reason=reason, source=source, store_id=store_id, since=since, replayed=replayed,
    )  # fmt: skip
    return int(session.scalar(query) or 0)


def get_dead_letter(*, session: Session, letter_id: int) -> DeadLetter | None:
    return session.get(DeadLetter, letter_id)


def replay_candidates(
    *,
    session: Session,
    ids: Sequence[int] | None = None,
    reason: str | None = None,
    source: str | None = None,
    since: datetime | None = None,
) -> list[int]:
    """Ids of the dead letters a replay selects, oldest first (already replayed ones included: they are skipped)."""
    query = _filtered(
        select(DeadLetter.id).order_by(DeadLetter.id),
        reason=reason, source=source, store_id=None, since=since, replayed=None,
    )  # fmt: skip
    if ids is not None:
        query = query.where(DeadLetter.id.in_(list(ids)))
    return list(session.scalars(query))


@dataclass(frozen=True)
class LetterOutcome:
    letter_id: int
    source: str
    outcome: Outcome
    events: int
    note: str | None = None


@dataclass
class ReplayReport:
    dry_run: bool
    letters: list[LetterOutcome] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    @property
    def counts(self) -> dict[Outcome, int]:
        counted = Counter(letter.outcome for letter in self.letters)
        return {outcome: counted[outcome] for outcome in OUTCOMES}

    def extend(self, other: ReplayReport) -> None:
        self.letters.extend(other.letters)
        self.missing.extend(other.missing)


@dataclass(frozen=True)
class _Prepared:
    """What a dead letter turns into once decoded: events, a till's ack, or a reason it cannot be stored."""

    items: list[Inbound] = field(default_factory=list)
    allowed_store_id: str | None = None
    ack: tuple[str, str, int] | None = None
    refused: str | None = None


def _prepare(session: Session, letter: DeadLetter, topic_prefix: str) -> _Prepared:
    kind, _, where = letter.source.partition(":")
    if kind == "mqtt":
        # The worker's own decoding: batches, the topic's store and event types, acks.
        decoded = decode(Received(0, 0, 1, where, letter.raw_payload.encode("utf-8"), 0.0), topic_prefix)
        if decoded.dead_reason is not None:
            return _Prepared(refused=decoded.dead_reason)
        if decoded.ack is not None:
            return _Prepared(ack=(decoded.ack.store_id, decoded.ack.terminal_id, decoded.ack.version))
        return _Prepared(items=decoded.items)
    try:
        payload = json.loads(letter.raw_payload)
    except ValueError as exc:
        return _Prepared(refused=f"payload: not valid JSON ({exc})")
    if kind == "http":
        # An HTTP device may publish only for the store of its token; a replay must not widen that.
        stores = set(session.scalars(select(DeviceToken.store_id).where(DeviceToken.name == where)))
        payload_store = payload.get("store_id") if isinstance(payload, dict) else None
        if payload_store in stores:
            allowed = payload_store
        elif len(stores) == 1:
            allowed = next(iter(stores))
        else:
            return _Prepared(refused=f"store_id: no device token named {where!r} publishes for store {payload_store!r}")
        return _Prepared(items=[Inbound(payload, letter.source)], allowed_store_id=allowed)
    # The POS API, the simulator and importers store one validated event per dead letter.
    return _Prepared(items=[Inbound(payload, letter.source)])


def _summarise(results: Sequence[EventResult]) -> tuple[Outcome, str | None]:
    refused = [r for r in results if r.status == "rejected"]
    if refused:
        reasons = [f"{r.event_id}: {r.error}" if r.event_id and len(results) > 1 else str(r.error) for r in refused]
        more = len(reasons) - MAX_NOTE_REASONS
        return "rejected", "; ".join(reasons[:MAX_NOTE_REASONS]) + (f"; and {more} more" if more > 0 else "")
    if any(r.status == "accepted" for r in results):
        return "accepted", None
    return "duplicate", None


def _replay_one(session: Session, letter: DeadLetter, topic_prefix: str) -> tuple[Outcome, int, str | None]:
    prepared = _prepare(session, letter, topic_prefix)
    if prepared.refused is not None:
        return "rejected", 0, prepared.refused
    if prepared.ack is not None:
        store_id, terminal_id, version = prepared.ack
        try:
            recorded = record_promotion_ack(
                session=session, store_id=store_id, terminal_id=terminal_id, version=version,
                source=letter.source, at=letter.received_at,
            )  # fmt: skip
        except AckError as exc:
            return "rejected", 0, str(exc)
        return ("accepted" if recorded else "duplicate"), 0, None
    if not prepared.items:
        return "rejected", 0, "events: the batch holds no event"
    # "Not in the future" is judged against when the payload arrived, not against today.
    results = ingest_inbound(
        prepared.items, session=session, allowed_store_id=prepared.allowed_store_id, now=letter.received_at
    )
    outcome, note = _summarise(results)
    return outcome, len(results), note


def replay_dead_letters(
    *,
    session: Session,
    ids: Sequence[int],
    dry_run: bool = False,
    actor: str | None = None,
    ip: str | None = None,
    topic_prefix: str | None = None,
    now: datetime | None = None,
) -> ReplayReport:
    """Replay these dead letters (already replayed ones are skipped); `dry_run` writes nothing at all.

    `actor` (who replays) is audited with the outcome when something was written.
    """
    prefix = topic_prefix or get_settings().mqtt_topic_prefix
    moment = now or datetime.now(UTC)
    report = ReplayReport(dry_run=dry_run)
    # Whatever a dry run writes (events, hooks' rows, outcomes) lives only in this savepoint.
    outer = session.begin_nested() if dry_run else None
    try:
        letters = {
            letter.id: letter
            for letter in session.scalars(
                select(DeadLetter).where(DeadLetter.id.in_(list(ids))).order_by(DeadLetter.id).with_for_update()
            )
        }
        for letter_id in ids:
            letter = letters.get(letter_id)
            if letter is None:
                report.missing.append(letter_id)
                continue
            if letter.replayed_at is not None:
                earlier = f"already replayed at {letter.replayed_at:%Y-%m-%d %H:%M:%S} UTC ({letter.replay_status})"
                report.letters.append(LetterOutcome(letter.id, letter.source, "skipped", 0, earlier))
                continue
            attempt = session.begin_nested()
            try:
                outcome, events, note = _replay_one(session, letter, prefix)
            except BaseException:
                attempt.rollback()
                raise
            if outcome == "rejected":
                # Nothing of a refused letter stays: no partial batch, no second dead letter.
                attempt.rollback()
            else:
                attempt.commit()
            letter.replay_status = outcome
            letter.replay_note = note
            letter.replayed_at = None if outcome == "rejected" else moment
            report.letters.append(LetterOutcome(letter.id, letter.source, outcome, events, note))
        session.flush()
        if actor is not None and not dry_run and any(o.outcome != "skipped" for o in report.letters):
            replayed = [o.letter_id for o in report.letters if o.outcome != "skipped"]
            audit.record(
                session=session, actor=actor, action="dead_letters_replay",
                target=",".join(map(str, replayed))[:200], detail={"counts": report.counts, "ids": replayed},
                ip=ip, at=moment,
            )  # fmt: skip
    finally:
        if outer is not None:
            outer.rollback()
    return report
