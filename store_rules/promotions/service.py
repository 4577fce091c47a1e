"""The promotion lifecycle, as plain functions taking a session.

A rule (or a person) drafts a promotion from a template; the store's manager or headquarters
approves it (possibly with edited parameters, within the template's bounds) or rejects it
with a reason; an undecided draft expires. Every change is audited. Approving, retracting or
ending a promotion stores a new version of the store's promotion set; a publisher adapter
then sends the newest unpublished version, retained, to the store's tills (an outbox: a set
that could not be sent stays unpublished and is retried by the scheduler). Tills acknowledge
versions; the execution rate compares the sale lines that carried a promotion with all its
eligible sale lines while it was active.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from cachetools import TTLCache
from sqlalchemy import Engine, and_, case, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters.publish.base import PromotionPublisher, PublishError
from ingest import audit
from ingest.db import is_postgres, session_scope
from ingest.models import PromotionAck, ReceiptLine, Sku, Store, Terminal
from store_rules.metrics import Ratio
from store_rules.promotion_events import PromotionDecided, promotion_decided
from store_rules.promotions.models import (
    ACTIVE,
    ENDED,
    EXPIRED,
    OPEN_STATUSES,
    PENDING,
    REJECTED,
    RETRACTED,
    Promotion,
    PromotionAudit,
    PromotionSet,
)
from store_rules.promotions.templates import PromotionTemplate, json_number, plain, stored_template

log = logging.getLogger(__name__)
SYSTEM = "system"


class PromotionError(ValueError):
    """A request that cannot be carried out; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


# --- drafting --------------------------------------------------------------------------------


def _audit(
    session: Session,
    promotion: Promotion,
    action: str,
    before: str | None,
    actor: str,
    at: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    if actor != SYSTEM:  # people's decisions also go to the audit log of logins and approvals
        audit.record(
            session=session, actor=actor, action=f"promotion_{action}", target=promotion.promotion_id,
            detail={"store_id": promotion.store_id, **(detail or {})}, at=at,
        )  # fmt: skip
    session.add(
        PromotionAudit(
            promotion_pk=promotion.id, at=at, action=action, from_status=before, to_status=promotion.status,
            actor=actor, detail=detail or {},
        )
    )  # fmt: skip


def _text_values(session: Session, template: PromotionTemplate, promotion: Promotion) -> dict[str, Any]:
    codes = [promotion.sku] + ([template.gift_sku] if template.gift_sku else [])
    names = {
        row.sku: {"zh-CN": row.name_zh, "en": row.name_en}
        for row in session.scalars(select(Sku).where(Sku.sku.in_(codes)))
    }
    values: dict[str, Any] = {name: plain(Decimal(str(v))) for name, v in promotion.params.items()}
    values.update(
        sku=promotion.sku,
        sku_name=names.get(promotion.sku, {"zh-CN": promotion.sku, "en": promotion.sku}),
        gift_name=names.get(template.gift_sku or "", {"zh-CN": template.gift_sku or "", "en": template.gift_sku or ""}),
        limit_units=plain(promotion.limit_units) if promotion.limit_units is not None else "",
        days=str(promotion.duration_days),
    )
    return values


def _params_json(params: dict[str, Decimal]) -> dict[str, int | float]:
    return {name: json_number(value) for name, value in params.items()}


def blocks_new_draft(
    *, session: Session, store_id: str, sku: str, template_id: str, cooldown_days: int, now: datetime
) -> bool:
    """Whether a draft for store × SKU × template must not be made: one is open, or one was refused lately."""
    since = now - timedelta(days=cooldown_days)
    found = session.scalar(
        select(Promotion.id)
        .where(
            Promotion.store_id == store_id,
            Promotion.sku == sku,
            Promotion.template_id == template_id,
            or_(
                Promotion.status.in_(OPEN_STATUSES),
                and_(Promotion.status.in_([REJECTED, EXPIRED]), Promotion.decided_at >= since),
            ),
        )
        .limit(1)
    )
    return found is not None


def draft(
    *,
    session: Session,
    store: Store,
    sku: str,
    template: PromotionTemplate,
    evidence: dict[str, Any],
    now: datetime,
    rule_id: str | None = None,
    limit_units: Decimal | None = None,
    actor: str = SYSTEM,
) -> Promotion | None:
    """A pending draft of `template` for the store and SKU; None when one is already pending or active."""
    promotion = Promotion(
        promotion_id=f"PR{now:%y%m%d}-{secrets.token_hex(4).upper()}",
        store_id=store.store_id,
        region_id=store.region_id,
        sku=sku,
        eligible_skus=sorted(
            {sku, *template.eligible.skus} if template.eligible.subject else set(template.eligible.skus)
        ),
        template_id=template.id,
        template_version=template.version,
        kind=template.kind,
        params=_params_json(template.defaults()),
        limit_units=limit_units if template.limit_units_from_evidence else None,
        title={},
        till_text={},
        status=PENDING,
        rule_id=rule_id,
        evidence=evidence,
        duration_days=template.duration_days,
        created_at=now,
        decide_by=now + timedelta(hours=template.decide_within_hours),
    )
    promotion.title, promotion.till_text = template.texts(_text_values(session, template, promotion))
    # The partial unique index is the guard against a concurrent evaluation drafting the same thing.
    try:
        with session.begin_nested():
            session.add(promotion)
            session.flush()
    except IntegrityError:
        return None
    _audit(session, promotion, "drafted", None, actor, now, {"rule_id": rule_id, "params": promotion.params})
    return promotion


def link_alert(*, session: Session, promotion: Promotion, alert_id: int) -> None:
    promotion.alert_id = alert_id
    session.flush()


# --- decisions -------------------------------------------------------------------------------


def get_promotion(*, session: Session, promotion_id: str) -> Promotion:
    promotion = session.scalar(select(Promotion).where(Promotion.promotion_id == promotion_id))
    if promotion is None:
        raise PromotionError(f"promotion_id: no promotion {promotion_id!r}", 404)
    return promotion


def _decided(session: Session, promotion: Promotion, note: str, now: datetime) -> None:
    """Tell the subscribers (the alert side closes the alert that drafted it) in this transaction."""
    event = PromotionDecided(
        promotion_id=promotion.promotion_id, store_id=promotion.store_id, outcome=promotion.status,
        alert_id=promotion.alert_id, note=note, at=now,
    )  # fmt: skip
    promotion_decided(session, event)


def lock_store_set(*, session: Session, store_id: str) -> None:
    """Serialise everything that changes the store's set until this transaction ends.

    The set is computed from the active promotions; without the lock two decisions at once
    (two approvals, an approval and an expiry or a retraction) each compute it from a view
    that lacks the other's change, and the newest version misses a live promotion. Taken
    before a promotion's status changes, so decisions queue up instead of deadlocking.
    On PostgreSQL a transaction-scoped advisory lock per store (the statements after it, in
    READ COMMITTED, see what the previous holder committed); SQLite transactions begin
    IMMEDIATE (ingest.db), so writers are serialised already.
    """
    if is_postgres(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"promotion_set:{store_id}"}
        )


def _move(session: Session, promotion: Promotion, before: str, values: dict[str, Any]) -> bool:
    """Conditional update: two people deciding at once, only the first one wins."""
    result = session.execute(
        update(Promotion).where(Promotion.id == promotion.id, Promotion.status == before).values(**values)
    )
    session.refresh(promotion)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _refuse_unless(promotion: Promotion, status: str, action: str) -> None:
    if promotion.status != status:
        raise PromotionError(
            f"status: promotion {promotion.promotion_id} is {promotion.status}; only a {status} one can be {action}"
        )


def approve(
    *,
    session: Session,
    promotion_id: str,
    user_id: str,
    params: dict[str, Any] | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> Promotion:
    now = now or datetime.now(UTC)
    promotion = get_promotion(session=session, promotion_id=promotion_id)
    lock_store_set(session=session, store_id=promotion.store_id)
    session.refresh(promotion)  # as the previous holder of the lock left it
    _refuse_unless(promotion, PENDING, "approved")
    if promotion.decide_by <= now:
        expire_due(session=session, now=now)
        raise PromotionError(f"decide_by: the draft expired at {promotion.decide_by.isoformat()}")
    template = stored_template(session=session, template_id=promotion.template_id, version=promotion.template_version)
    if template is None:
        raise PromotionError(f"template: version {promotion.template_version} of {promotion.template_id} is gone", 500)
    current = {name: Decimal(str(value)) for name, value in promotion.params.items()}
    try:
        checked = template.checked_params({**{k: str(v) for k, v in current.items()}, **(params or {})})
    except ValueError as exc:
        raise PromotionError(str(exc), 422) from None
    before_params = dict(promotion.params)
    promotion.params = _params_json(checked)
    title, till_text = template.texts(_text_values(session, template, promotion))
    values = {
        "status": ACTIVE, "params": promotion.params, "title": title, "till_text": till_text, "decided_at": now,
        "decided_by": user_id, "starts_at": now, "ends_at": now + timedelta(days=promotion.duration_days),
    }  # fmt: skip
    if not _move(session, promotion, PENDING, values):
        raise PromotionError(f"status: promotion {promotion_id} was decided meanwhile ({promotion.status})")
    detail: dict[str, Any] = {"note": note}
    if promotion.params != before_params:
        detail["params_before"], detail["params_after"] = before_params, promotion.params
    _audit(session, promotion, "approved", PENDING, user_id, now, detail)
    _decided(session, promotion, f"draft {promotion_id} approved by {user_id}", now)
    new_set(session=session, store_id=promotion.store_id, reason=f"approved {promotion_id}", now=now)
    return promotion


def reject(*, session: Session, promotion_id: str, user_id: str, reason: str, now: datetime | None = None) -> Promotion:
    now = now or datetime.now(UTC)
    if not reason or not reason.strip():
        raise PromotionError("reason: a rejection needs a reason", 422)
    promotion = get_promotion(session=session, promotion_id=promotion_id)
    _refuse_unless(promotion, PENDING, "rejected")
    values = {"status": REJECTED, "decided_at": now, "decided_by": user_id, "reason": reason.strip()}
    if not _move(session, promotion, PENDING, values):
        raise PromotionError(f"status: promotion {promotion_id} was decided meanwhile ({promotion.status})")
    _audit(session, promotion, "rejected", PENDING, user_id, now, {"reason": reason.strip()})
    _decided(session, promotion, f"draft {promotion_id} rejected by {user_id}: {reason.strip()}", now)
    return promotion


def retract(
    *, session: Session, promotion_id: str, user_id: str, reason: str, now: datetime | None = None
) -> Promotion:
    """Take an active promotion off the tills before its end."""
    now = now or datetime.now(UTC)
    if not reason or not reason.strip():
        raise PromotionError("reason: a retraction needs a reason", 422)
    promotion = get_promotion(session=session, promotion_id=promotion_id)
    lock_store_set(session=session, store_id=promotion.store_id)
    session.refresh(promotion)
    _refuse_unless(promotion, ACTIVE, "retracted")
    if not _move(session, promotion, ACTIVE, {"status": RETRACTED, "ended_at": now, "reason": reason.strip()}):
        raise PromotionError(f"status: promotion {promotion_id} changed meanwhile ({promotion.status})")
    _audit(session, promotion, "retracted", ACTIVE, user_id, now, {"reason": reason.strip()})
    new_set(session=session, store_id=promotion.store_id, reason=f"retracted {promotion_id}", now=now)
    return promotion


@dataclass
class Housekeeping:
    expired: list[str]
    ended: list[str]


def expire_due(*, session: Session, now: datetime | None = None) -> Housekeeping:
    """Drafts past their decision time expire; active promotions past their end leave the tills."""
    now = now or datetime.now(UTC)
    done = Housekeeping([], [])
    for promotion in session.scalars(select(Promotion).where(Promotion.status == PENDING, Promotion.decide_by <= now)):
        if _move(session, promotion, PENDING, {"status": EXPIRED, "decided_at": now, "decided_by": SYSTEM}):
            _audit(session, promotion, "expired", PENDING, SYSTEM, now, {"decide_by": promotion.decide_by.isoformat()})
            _decided(session, promotion, f"draft {promotion.promotion_id} expired undecided", now)
            done.expired.append(promotion.promotion_id)
    stores: set[str] = set()
    ending = session.scalars(
        select(Promotion)
        .where(Promotion.status == ACTIVE, Promotion.ends_at <= now)
        .order_by(Promotion.store_id, Promotion.id)  # locks in one order: two housekeepers never deadlock
    ).all()
    for promotion in ending:
        lock_store_set(session=session, store_id=promotion.store_id)
        if _move(session, promotion, ACTIVE, {"status": ENDED, "ended_at": promotion.ends_at}):
            _audit(session, promotion, "ended", ACTIVE, SYSTEM, now, {})
            done.ended.append(promotion.promotion_id)
            stores.add(promotion.store_id)
    for store_id in sorted(stores):
        new_set(session=session, store_id=store_id, reason="ended", now=now)
    return done


# --- the store's set and its publication --------------------------------------------------


def promotion_json(promotion: Promotion) -> dict[str, Any]:
    """A promotion as tills see it."""
    return {
        "promotion_id": promotion.promotion_id, "kind": promotion.kind, "skus": promotion.eligible_skus,
        "params": promotion.params,
        "limit_units": json_number(promotion.limit_units) if promotion.limit_units is not None else None,
        "title": promotion.title, "till_text": promotion.till_text,
        "starts_at": promotion.starts_at.isoformat() if promotion.starts_at else None,
        "ends_at": promotion.ends_at.isoformat() if promotion.ends_at else None,
    }  # fmt: skip


def new_set(*, session: Session, store_id: str, reason: str, now: datetime) -> PromotionSet:
    """Store the next version of the store's active promotions (unpublished until a publisher sends it).

    Version and content are both read under the store's lock, so the newest version always holds
    exactly the promotions active once every decision before it committed.
    """
    lock_store_set(session=session, store_id=store_id)
    active = session.scalars(
        select(Promotion)
        .where(Promotion.store_id == store_id, Promotion.status == ACTIVE)
        .order_by(Promotion.starts_at, Promotion.promotion_id)
        .execution_options(populate_existing=True)
    ).all()
    version = (session.scalar(select(func.max(PromotionSet.version)).where(PromotionSet.store_id == store_id)) or 0) + 1
    content = {
        "store_id": store_id, "version": version, "generated_at": now.isoformat(),
        "promotions": [promotion_json(p) for p in active],
    }  # fmt: skip
    row = PromotionSet(store_id=store_id, version=version, content=content, reason=reason[:200], created_at=now)
    session.add(row)
    session.flush()
    forget_cached_sets(store_id)
    return row


def current_set(*, session: Session, store_id: str) -> dict[str, Any]:
    """The newest version of the store's set (version 0 and no promotions before the first approval)."""
    row = session.scalars(
        select(PromotionSet).where(PromotionSet.store_id == store_id).order_by(PromotionSet.version.desc()).limit(1)
    ).first()
    if row is None:
        return {"store_id": store_id, "version": 0, "generated_at": None, "promotions": []}
    return dict(row.content)


def publish_pending(
    *, engine: Engine, publisher: PromotionPublisher, store_ids: Iterable[str] | None = None
) -> list[tuple[str, int]]:
    """Send each store's newest unpublished set; older unpublished versions are superseded by it.

    Runs after the deciding transaction committed, so a till that reads the HTTP endpoint and
    one that gets the MQTT message see the same version. A failed send stays unpublished.
    """
    sent: list[tuple[str, int]] = []
    with session_scope(engine) as session:
        query = select(PromotionSet.store_id, func.max(PromotionSet.version)).where(PromotionSet.published_at.is_(None))
        if store_ids is not None:
            query = query.where(PromotionSet.store_id.in_(list(store_ids)))
        pending = session.execute(query.group_by(PromotionSet.store_id)).all()
    for store_id, version in pending:
        with session_scope(engine) as session:
            newest = current_set(session=session, store_id=store_id)
            if newest["version"] != version:
                continue  # a newer version appeared meanwhile; its own publish sends it
            try:
                publisher.publish(store_id, newest)
            except PublishError as exc:
                log.warning("promotion set %s v%d not published (%s); the scheduler retries", store_id, version, exc)
                continue
            session.execute(
                update(PromotionSet)
                .where(
                    PromotionSet.store_id == store_id,
                    PromotionSet.version <= version,
                    PromotionSet.published_at.is_(None),
                )
                .values(published_at=datetime.now(UTC))
            )
            sent.append((store_id, version))
    return sent


# Scans ask for a store's active promotions many times a second; the set changes a few times a
# day. Sets are cached per process for a short time (promotions_cache_s) and dropped when this
# process stores one. Bounded: a process serving the whole chain keeps the busiest stores only.
SET_CACHE_STORES = 1024
SetsBySku = dict[str, list[dict[str, Any]]]
_set_caches: dict[float, TTLCache[tuple[int, str], SetsBySku]] = {}  # one per time-to-live in use (one)
_set_cache_lock = threading.Lock()


def _set_cache(ttl_s: float) -> TTLCache[tuple[int, str], SetsBySku]:
    cache = _set_caches.get(ttl_s)
    if cache is None:
        cache = _set_caches.setdefault(ttl_s, TTLCache(maxsize=SET_CACHE_STORES, ttl=ttl_s))
    return cache


def forget_cached_sets(store_id: str | None = None) -> None:
    with _set_cache_lock:
        for cache in _set_caches.values():
            for key in [k for k in list(cache) if store_id is None or k[1] == store_id]:
                cache.pop(key, None)


def cached_set_count() -> int:
    """How many stores' sets this process holds (expired ones are not counted)."""
    with _set_cache_lock:
        for cache in _set_caches.values():
            cache.expire()
        return sum(len(cache) for cache in _set_caches.values())


def active_for_sku(*, session: Session, store_id: str, sku: str, ttl_s: float = 2.0) -> list[dict[str, Any]]:
    """The store's active promotions that apply to `sku`, as in the newest set."""
    key = (id(session.get_bind()), store_id)
    with _set_cache_lock:
        cache = _set_cache(ttl_s)
        hit = cache.get(key)
    if hit is None:
        by_sku: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for promotion in current_set(session=session, store_id=store_id)["promotions"]:
            for code in promotion["skus"]:
                by_sku[code].append(promotion)
        hit = dict(by_sku)
        with _set_cache_lock:
            cache[key] = hit
    return hit.get(sku, [])


# --- acknowledgements and execution --------------------------------------------------------


@dataclass(frozen=True)
class TillDelivery:
    terminal_id: str
    delivered_version: int | None  # the highest version the till acknowledged
    acked_at: datetime | None


def till_deliveries(*, session: Session, store_id: str) -> list[TillDelivery]:
    """Each till of the store (master data, plus any till that acknowledged) with its delivered version."""
    terminals = set(session.scalars(select(Terminal.terminal_id).where(Terminal.store_id == store_id)))
    newest = dict(
        session.execute(
            select(PromotionAck.terminal_id, func.max(PromotionAck.promotions_version))
            .where(PromotionAck.store_id == store_id)
            .group_by(PromotionAck.terminal_id)
        ).all()
    )
    acked_at = {
        (terminal, version): at
        for terminal, version, at in session.execute(
            select(PromotionAck.terminal_id, PromotionAck.promotions_version, PromotionAck.acked_at).where(
                PromotionAck.store_id == store_id
            )
        )
    }
    out = []
    for terminal in sorted(terminals | set(newest)):
        version = newest.get(terminal)
        out.append(TillDelivery(terminal, version, acked_at.get((terminal, version)) if version else None))
    return out


def first_version_with(*, session: Session, promotion: Promotion) -> int | None:
    """The first set version of the store that carried the promotion."""
    rows = session.execute(
        select(PromotionSet.version, PromotionSet.content)
        .where(PromotionSet.store_id == promotion.store_id, PromotionSet.created_at >= promotion.created_at)
        .order_by(PromotionSet.version)
    ).all()
    for version, content in rows:
        if any(p["promotion_id"] == promotion.promotion_id for p in content.get("promotions", [])):
            return int(version)
    return None


def tills_never_acknowledged(*, session: Session, promotion: Promotion) -> list[str]:
    """Tills of the store that never acknowledged a set version carrying the promotion."""
    first = first_version_with(session=session, promotion=promotion)
    if first is None:
        return []
    return [
        t.terminal_id
        for t in till_deliveries(session=session, store_id=promotion.store_id)
        if t.delivered_version is None or t.delivered_version < first
    ]


@dataclass(frozen=True)
class Execution:
    """促销核销率 of one promotion: eligible sale lines carrying it ÷ eligible sale lines while it was active."""

    promotion_id: str
    store_id: str
    ratio: Ratio
    since: datetime | None
    until: datetime | None


def execution(
    *, session: Session, promotion: Promotion, since: datetime | None = None, until: datetime | None = None
) -> Execution:
    """The execution rate over the promotion's active time, narrowed to [since, until) when given."""
    start = promotion.starts_at
    end = promotion.ended_at or promotion.ends_at
    if start is None:
        return Execution(promotion.promotion_id, promotion.store_id, Ratio(0, 0), None, None)
    if since is not None:
        start = max(start, since)
    end = min(end or datetime.now(UTC), datetime.now(UTC))
    if until is not None:
        end = min(end, until)
    if end <= start:
        return Execution(promotion.promotion_id, promotion.store_id, Ratio(0, 0), start, end)
    carried = func.sum(case((ReceiptLine.promotion_id == promotion.promotion_id, 1), else_=0))
    row = session.execute(
        select(func.count(), carried).where(
            ReceiptLine.store_id == promotion.store_id,
            ReceiptLine.kind == "sale",
            ReceiptLine.sku.in_(promotion.eligible_skus),
            ReceiptLine.occurred_at >= start,
            ReceiptLine.occurred_at < end,
        )
    ).one()
    return Execution(promotion.promotion_id, promotion.store_id, Ratio(int(row[1] or 0), int(row[0])), start, end)


def execution_by_store(
    *, session: Session, since: datetime, until: datetime, store_ids: Iterable[str] | None = None
) -> dict[str, Ratio]:
    """促销核销率 per store over [since, until): every promotion's lines summed, then divided."""
    query = select(Promotion).where(
        Promotion.starts_at.is_not(None),
        Promotion.starts_at < until,
        or_(Promotion.ended_at.is_(None), Promotion.ended_at > since),
    )
    if store_ids is not None:
        query = query.where(Promotion.store_id.in_(list(store_ids)))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for promotion in session.scalars(query):
        ratio = execution(session=session, promotion=promotion, since=since, until=until).ratio
        totals[promotion.store_id][0] += ratio.numerator
        totals[promotion.store_id][1] += ratio.denominator
    return {store: Ratio(n, d) for store, (n, d) in sorted(totals.items())}


def list_promotions(
    *,
    session: Session,
    status: str | None = None,
    store_ids: Iterable[str] | None = None,
    region_id: str | None = None,
    limit: int = 200,
) -> list[Promotion]:
    query = select(Promotion).order_by(Promotion.created_at.desc(), Promotion.id.desc()).limit(limit)
    if status:
        query = query.where(Promotion.status == status)
    if store_ids is not None:
        query = query.where(Promotion.store_id.in_(list(store_ids)))
    if region_id:
        query = query.where(Promotion.region_id == region_id)
    return list(session.scalars(query))


def audit_trail(*, session: Session, promotion: Promotion) -> list[PromotionAudit]:
    return list(
        session.scalars(
            select(PromotionAudit).where(PromotionAudit.promotion_pk == promotion.id).order_by(PromotionAudit.id)
        )
    )
