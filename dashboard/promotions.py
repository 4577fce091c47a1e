"""The promotion API: drafts and decisions for people, the store's set and acknowledgements for tills.

People use their personal token; who reads and who decides which promotion is
`dashboard.permissions` (a store's manager the store's drafts, headquarters and admins any;
everyone else in scope reads, 403 on a decision). Tills use their device token and only reach
their own store.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from dashboard.alerts import User, chain_days, list_scope
from dashboard.deps import Device
from dashboard.permissions import of_person
from dashboard.pos import own_store
from ingest.db import session_scope
from ingest.models import Store
from ingest.service import AckError, record_promotion_ack
from store_rules.promotions import service
from store_rules.promotions.models import Promotion

router = APIRouter(prefix="/api/v1", tags=["promotions"])


class ApproveIn(BaseModel):
    params: dict[str, Any] | None = Field(default=None, description="edited parameters, within the template's bounds")
    note: str | None = Field(default=None, max_length=2000)


class ReasonIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class AckIn(BaseModel):
    terminal_id: str = Field(min_length=1, max_length=64)
    promotions_version: int = Field(ge=1)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def promotion_json(promotion: Promotion) -> dict[str, Any]:
    return {
        "promotion_id": promotion.promotion_id, "store_id": promotion.store_id, "region_id": promotion.region_id,
        "sku": promotion.sku, "skus": promotion.eligible_skus, "template_id": promotion.template_id,
        "template_version": promotion.template_version, "kind": promotion.kind, "params": promotion.params,
        "limit_units": float(promotion.limit_units) if promotion.limit_units is not None else None,
        "title": promotion.title, "till_text": promotion.till_text, "status": promotion.status,
        "rule_id": promotion.rule_id, "alert_id": promotion.alert_id, "evidence": promotion.evidence,
        "created_at": _iso(promotion.created_at), "decide_by": _iso(promotion.decide_by),
        "decided_at": _iso(promotion.decided_at), "decided_by": promotion.decided_by, "reason": promotion.reason,
        "starts_at": _iso(promotion.starts_at), "ends_at": _iso(promotion.ends_at),
        "ended_at": _iso(promotion.ended_at),
    }  # fmt: skip


def _error(exc: service.PromotionError) -> HTTPException:
    return HTTPException(exc.status, detail=str(exc))


def publish_store(request: Request, store_id: str) -> None:
    """Send the store's newest set now (after the deciding commit); the scheduler retries a failure."""
    publisher = request.app.state.publisher
    if publisher is not None:
        service.publish_pending(engine=request.app.state.engine, publisher=publisher, store_ids=[store_id])


@router.get("/promotions")
def promotions_list(
    request: Request, user: User, status: str | None = None, store_id: str | None = None, limit: int = 200
) -> dict[str, Any]:
    """Promotions in the caller's scope, newest first (filter by status: pending, active, ...)."""
    with session_scope(request.app.state.engine) as session:
        store_ids, region_id = list_scope(session, user, store_id)
        rows = service.list_promotions(
            session=session, status=status, store_ids=store_ids, region_id=region_id, limit=min(limit, 1000)
        )
        may = of_person(user)
        return {"promotions": [{**promotion_json(p), "may_decide": may.may_decide_promotion(p)} for p in rows]}


@router.get("/promotions/execution")
def promotions_execution(
    request: Request, user: User, from_: Annotated[date | None, Query(alias="from")] = None, to: date | None = None
) -> dict[str, Any]:
    """促销核销率 per store in the caller's scope for the days [from, to] (chain time zone; default: 30 days)."""
    first, last, since, until = chain_days(request, from_, to)
    with session_scope(request.app.state.engine) as session:
        store_ids, region_id = list_scope(session, user, None)
        if region_id is not None:
            store_ids = list(session.scalars(select(Store.store_id).where(Store.region_id == region_id)))
        rates = service.execution_by_store(session=session, since=since, until=until, store_ids=store_ids)
    return {
        "from": first.isoformat(), "to": last.isoformat(),
        "by_store": {
            store: {"redeemed_lines": r.numerator, "eligible_lines": r.denominator, "percent": r.percent}
            for store, r in rates.items()
        },
    }  # fmt: skip


@router.get("/promotions/{promotion_id}")
def promotion_detail(promotion_id: str, request: Request, user: User) -> dict[str, Any]:
    """One promotion with its audit trail, execution rate and the tills that never acknowledged it."""
    with session_scope(request.app.state.engine) as session:
        try:
            promotion = service.get_promotion(session=session, promotion_id=promotion_id)
        except service.PromotionError as exc:
            raise _error(exc) from None
        may = of_person(user)
        if not may.sees_promotion(promotion):
            raise HTTPException(403, detail=f"promotion_id: promotion {promotion_id} is outside your scope")
        rate = service.execution(session=session, promotion=promotion)
        body = promotion_json(promotion)
        body["may_decide"] = may.may_decide_promotion(promotion)
        body["audit"] = [
            {"at": a.at.isoformat(), "action": a.action, "from": a.from_status, "to": a.to_status, "actor": a.actor,
             "detail": a.detail}
            for a in service.audit_trail(session=session, promotion=promotion)
        ]  # fmt: skip
        body["execution"] = {
            "redeemed_lines": rate.ratio.numerator, "eligible_lines": rate.ratio.denominator,
            "percent": rate.ratio.percent, "since": _iso(rate.since), "until": _iso(rate.until),
        }  # fmt: skip
        body["first_set_version"] = service.first_version_with(session=session, promotion=promotion)
        body["tills_never_acknowledged"] = service.tills_never_acknowledged(session=session, promotion=promotion)
        return body


def _decide(request: Request, user: User, promotion_id: str, action: str, body: Any) -> dict[str, Any]:
    with session_scope(request.app.state.engine) as session:
        try:
            promotion = service.get_promotion(session=session, promotion_id=promotion_id)
            may = of_person(user)
            if not may.sees_promotion(promotion) or not may.may_decide_promotion(promotion):
                raise HTTPException(
                    403,
                    detail=f"promotion_id: only the manager of store {promotion.store_id} or headquarters may decide "
                    f"promotion {promotion_id}",
                )
            if action == "approve":
                promotion = service.approve(
                    session=session, promotion_id=promotion_id, user_id=user.user_id, params=body.params, note=body.note
                )
            elif action == "reject":
                promotion = service.reject(
                    session=session, promotion_id=promotion_id, user_id=user.user_id, reason=body.reason
                )
            else:
                promotion = service.retract(
                    session=session, promotion_id=promotion_id, user_id=user.user_id, reason=body.reason
                )
        except service.PromotionError as exc:
            raise _error(exc) from None
        result = promotion_json(promotion)
    if action != "reject":
        publish_store(request, result["store_id"])
    return result


@router.post("/promotions/{promotion_id}/approve")
def promotion_approve(promotion_id: str, request: Request, user: User, body: ApproveIn | None = None) -> dict[str, Any]:
    """Approve a pending draft (optionally with edited parameters): the store's tills get it within seconds."""
    return _decide(request, user, promotion_id, "approve", body or ApproveIn())


@router.post("/promotions/{promotion_id}/reject")
def promotion_reject(promotion_id: str, request: Request, user: User, body: ReasonIn) -> dict[str, Any]:
    """Reject a pending draft; the reason is required and audited."""
    return _decide(request, user, promotion_id, "reject", body)


@router.post("/promotions/{promotion_id}/retract")
def promotion_retract(promotion_id: str, request: Request, user: User, body: ReasonIn) -> dict[str, Any]:
    """Take an active promotion off the tills before its end (a new set version is published)."""
    return _decide(request, user, promotion_id, "retract", body)


@router.get("/stores/{store_id}/promotions/status")
def store_promotion_status(store_id: str, request: Request, user: User, days: int = 7) -> dict[str, Any]:
    """Headquarters' view of one store: the set version, each till's delivered version, execution per promotion."""
    tz = ZoneInfo(request.app.state.settings.timezone)
    with session_scope(request.app.state.engine) as session:
        store = session.get(Store, store_id)
        if store is None or not of_person(user).sees_store(store.store_id, store.region_id):
            raise HTTPException(403, detail=f"store_id: store {store_id!r} is outside your scope")
        current = service.current_set(session=session, store_id=store_id)
        since = datetime.combine(datetime.now(tz).date() - timedelta(days=max(days, 1) - 1), time(), tz).astimezone(UTC)
        rows = session.scalars(
            select(Promotion)
            .where(
                Promotion.store_id == store_id,
                Promotion.starts_at.is_not(None),
                (Promotion.ended_at.is_(None)) | (Promotion.ended_at >= since),
            )
            .order_by(Promotion.starts_at)
        ).all()
        promotions = []
        for promotion in rows:
            rate = service.execution(session=session, promotion=promotion)
            promotions.append(
                {
                    "promotion_id": promotion.promotion_id, "status": promotion.status, "title": promotion.title,
                    "redeemed_lines": rate.ratio.numerator, "eligible_lines": rate.ratio.denominator,
                    "execution_percent": rate.ratio.percent,
                    "tills_never_acknowledged": service.tills_never_acknowledged(session=session, promotion=promotion),
                }
            )  # fmt: skip
        tills = [
            {"terminal_id": t.terminal_id, "delivered_version": t.delivered_version, "acked_at": _iso(t.acked_at),
             "up_to_date": t.delivered_version == current["version"]}
            for t in service.till_deliveries(session=session, store_id=store_id)
        ]  # fmt: skip
        return {"store_id": store_id, "version": current["version"], "tills": tills, "promotions": promotions}


@router.get("/stores/{store_id}/promotions")
def store_promotions(store_id: str, request: Request, device: Device) -> dict[str, Any]:
    """The store's active promotions and their set version, for tills without MQTT."""
    own_store(device, store_id)
    with session_scope(request.app.state.engine) as session:
        return service.current_set(session=session, store_id=store_id)


@router.post("/stores/{store_id}/promotions/ack")
def store_promotions_ack(store_id: str, body: AckIn, request: Request, device: Device) -> dict[str, Any]:
    """A till without MQTT acknowledges the set version it applied (same record as the MQTT ack)."""
    own_store(device, store_id)
    with session_scope(request.app.state.engine) as session:
        current = service.current_set(session=session, store_id=store_id)["version"]
        if body.promotions_version > current:
            raise HTTPException(
                422, detail=f"promotions_version: store {store_id} has no version {body.promotions_version} yet"
            )
        try:
            created = record_promotion_ack(
                session=session, store_id=store_id, terminal_id=body.terminal_id, version=body.promotions_version,
                source=f"http:{device.name}",
            )  # fmt: skip
        except AckError as exc:
            raise HTTPException(422, detail=str(exc)) from None
    return {"store_id": store_id, "terminal_id": body.terminal_id, "promotions_version": body.promotions_version,
            "recorded": created}  # fmt: skip
