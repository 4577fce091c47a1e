"""The alert API: list, detail, acknowledge, resolve, response timeliness.

People authenticate with their personal token. Who sees and acknowledges which alert, and
who gets the evidence's customer names and symptoms unmasked, is `dashboard.permissions`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dashboard.deps import bearer_token, get_db_engine
from dashboard.permissions import PersonPermissions, of_person
from ingest.db import session_scope
from ingest.models import Store
from ingest.users import Principal, authenticate_user
from store_rules.alerts import service
from store_rules.alerts.models import Alert

router = APIRouter(prefix="/api/v1", tags=["alerts"])


def _lookup_user(engine: Engine, token: str) -> Principal | None:
    with session_scope(engine) as session:
        return authenticate_user(session=session, token=token)


async def current_user(request: Request, engine: Annotated[Engine, Depends(get_db_engine)]) -> Principal:
    token = bearer_token(request)
    principal = await run_in_threadpool(_lookup_user, engine, token) if token else None
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization: a personal token is required (Authorization: Bearer spu_...)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


User = Annotated[Principal, Depends(current_user)]


class NoteIn(BaseModel):
    note: str | None = Field(default=None, max_length=2000)


def alert_json(alert: Alert, may: PersonPermissions) -> dict[str, Any]:
    return {
        "alert_id": alert.id, "rule_id": alert.rule_id, "rule_version": alert.rule_version, "type": alert.rule_type,
        "severity": alert.severity, "store_id": alert.store_id, "region_id": alert.region_id,
        "subject": alert.subject, "window": [alert.window_start.isoformat(), alert.window_end.isoformat()],
        "status": alert.status, "level": alert.level, "role": alert.role, "summary": alert.summary,
        "values": alert.values,
        "evidence": may.evidence(alert),
        "evidence_masked": not may.evidence_unmasked(alert),
        "raised_at": alert.raised_at.isoformat(),
        "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
        "acknowledged_by": alert.acknowledged_by,
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        "resolved_by": alert.resolved_by,
        "escalated_at": alert.escalated_at.isoformat() if alert.escalated_at else None,
    }  # fmt: skip


def list_scope(session: Session, user: Principal, store_id: str | None) -> tuple[list[str] | None, str | None]:
    """(store ids, region id) a list may show the caller: the own store, the own region or the chain.

    Asking for a store outside the caller's scope is refused (403), not answered with an empty list.
    """
    may = of_person(user)
    scope = may.scope()
    store_ids, region_id = scope.store_ids, scope.region_id
    if store_id is not None:
        store = session.get(Store, store_id)
        if store is None or not may.sees_store(store.store_id, store.region_id):
            raise HTTPException(403, detail=f"store_id: store {store_id!r} is outside your scope")
        store_ids = [store_id]
    return store_ids, region_id


def _forbidden(alert_id: int) -> HTTPException:
    return HTTPException(403, detail=f"alert_id: alert {alert_id} is outside your scope")


@router.get("/alerts")
def alerts_list(
    request: Request, user: User, status: str | None = None, store_id: str | None = None, limit: int = 200
) -> dict[str, Any]:
    """Alerts in the caller's scope, newest first."""
    with session_scope(request.app.state.engine) as session:
        store_ids, region_id = list_scope(session, user, store_id)
        rows = service.list_alerts(
            session=session, status=status, store_ids=store_ids, region_id=region_id, limit=min(limit, 1000)
        )
        may = of_person(user)
        return {"alerts": [alert_json(a, may) for a in rows]}


def chain_days(request: Request, first: date | None, last: date | None) -> tuple[date, date, datetime, datetime]:
    """The days [first, last] of a report (default: the last 30 days) and their [since, until) in UTC.

    Days are the chain's (STOREPULSE_TIMEZONE): a report across stores needs one calendar.
    """
    tz = ZoneInfo(request.app.state.settings.timezone)
    last = last or datetime.now(tz).date()
    first = first or last - timedelta(days=29)
    since = datetime.combine(first, time(), tz).astimezone(UTC)
    until = datetime.combine(last + timedelta(days=1), time(), tz).astimezone(UTC)
    return first, last, since, until


@router.get("/alerts/timeliness")
def alerts_timeliness(
    request: Request, user: User, from_: Annotated[date | None, Query(alias="from")] = None, to: date | None = None
) -> dict[str, Any]:
    """预警响应及时率 (acknowledged within 24 h ÷ raised) for alerts raised in [from, to], chain time zone."""
    first, last, since, until = chain_days(request, from_, to)
    with session_scope(request.app.state.engine) as session:
        may = of_person(user)
        region_id, store_id = may.home_region_id, may.home_store_id
        result = service.response_timeliness(
            session=session, since=since, until=until, region_id=region_id, store_id=store_id
        )
        names = dict(session.execute(select(Store.store_id, Store.name_zh)).all())

    def ratio(r: Any) -> dict[str, Any]:
        # "due": acknowledged, or past its 24 h; an alert still inside them is pending, not late.
        return {"acknowledged_within_24h": r.numerator, "due": r.denominator, "percent": r.percent}

    return {
        "from": first.isoformat(), "to": last.isoformat(), "chain": {**ratio(result.chain), "pending": result.pending},
        "by_region": {k: {**ratio(v), "name": result.region_names.get(k)} for k, v in result.by_region.items()},
        "by_store": {k: {**ratio(v), "name": names.get(k)} for k, v in result.by_store.items()},
    }  # fmt: skip


@router.get("/alerts/{alert_id}")
def alert_detail(alert_id: int, request: Request, user: User) -> dict[str, Any]:
    """One alert with its evidence and every transition."""
    with session_scope(request.app.state.engine) as session:
        try:
            alert = service.get_alert(session=session, alert_id=alert_id)
        except service.AlertError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        may = of_person(user)
        if not may.sees_alert(alert):
            raise _forbidden(alert_id)
        body = alert_json(alert, may)
        body["transitions"] = [
            {"at": t.at.isoformat(), "action": t.action, "from": t.from_status, "to": t.to_status, "actor": t.actor,
             "note": t.note}
            for t in service.transitions(session=session, alert_id=alert_id)
        ]  # fmt: skip
        return body


def _transition(request: Request, user: User, alert_id: int, note: str | None, action: str) -> dict[str, Any]:
    with session_scope(request.app.state.engine) as session:
        try:
            alert = service.get_alert(session=session, alert_id=alert_id)
            may = of_person(user)
            if not may.sees_alert(alert) or not may.may_act_on_alert(alert):
                raise _forbidden(alert_id)
            change = service.acknowledge if action == "acknowledge" else service.resolve
            alert = change(session=session, alert_id=alert_id, user_id=user.user_id, note=note)
        except service.AlertError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        return alert_json(alert, may)


@router.post("/alerts/{alert_id}/ack")
def alert_ack(alert_id: int, request: Request, user: User, body: NoteIn | None = None) -> dict[str, Any]:
    """Acknowledge an open alert (who, when, note); 409 when it is not open."""
    return _transition(request, user, alert_id, body.note if body else None, "acknowledge")


@router.post("/alerts/{alert_id}/resolve")
def alert_resolve(alert_id: int, request: Request, user: User, body: NoteIn | None = None) -> dict[str, Any]:
    """Resolve an alert by hand; 409 when it is already resolved."""
    return _transition(request, user, alert_id, body.note if body else None, "resolve")
