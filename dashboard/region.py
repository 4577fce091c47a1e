"""The region view and the alert pages: a supervisor works the region's alerts and compares its stores.

A supervisor sees the own region, headquarters and admins any region; store people are refused.
Acknowledging and resolving are forms with the session's CSRF token; who may see and act on
an alert, and who sees the evidence's customer names and symptoms unmasked, is
`dashboard.permissions`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from dashboard.auth import Page, check_csrf
from dashboard.deps import DbSession
from dashboard.permissions import of_person
from dashboard.rendering import render
from dashboard.store_today import chain_today
from ingest.db import session_scope
from ingest.models import Region, Store
from store_rules.alerts import service as alerts
from store_rules.metrics import store_days

router = APIRouter(include_in_schema=False)

METRICS = ("insurance_pass_rate", "step_completeness", "symptom_completeness", "traceability", "conversion_rate")
TREND_DAYS = 14


def region_view(*, session: DbSession, region: Region, timezone: str) -> dict[str, Any]:
    """Today's figures, open alerts, the pass-rate trend and yesterday's metrics of the region's stores."""
    stores = list(session.scalars(select(Store).where(Store.region_id == region.region_id).order_by(Store.store_id)))
    ids = [s.store_id for s in stores]
    yesterday = datetime.now(ZoneInfo(timezone)).date() - timedelta(days=1)
    days = [yesterday - timedelta(days=n) for n in range(TREND_DAYS - 1, -1, -1)]
    metrics = store_days(session=session, store_ids=ids, days=days)
    today = next(
        (r for r in chain_today(session=session, timezone=timezone).regions if r.region.region_id == region.region_id),
        None,
    )
    return {
        "region": region,
        "stores": stores,
        "today": today,
        "yesterday": yesterday,
        "days": days,
        "trend": {(s, d): metrics[(s, d)].insurance_pass_rate for s in ids for d in days},
        "compare": {s: {m: getattr(metrics[(s, yesterday)], m) for m in METRICS} for s in ids},
        "metrics": METRICS,
        "alerts": [
            a
            for a in alerts.list_alerts(session=session, region_id=region.region_id, limit=200)
            if a.status != "resolved"
        ],
    }


def _region_in_scope(session: DbSession, page: Page, region_id: str) -> Region:
    region = session.get(Region, region_id)
    if region is None:
        raise HTTPException(404, detail=f"region_id: no region {region_id!r}")
    if not of_person(page.principal).sees_region(region_id):
        raise HTTPException(403, detail=f"region_id: region {region_id} is outside your scope")
    return region


@router.get("/regions/{region_id}", response_class=HTMLResponse)
def region_page(request: Request, region_id: str, session: DbSession, page: Page) -> HTMLResponse:
    region = _region_in_scope(session, page, region_id)
    view = region_view(session=session, region=region, timezone=request.app.state.settings.timezone)
    return render(request, "region.html", {**view, "user": page})


@router.get("/alerts/{alert_id}", response_class=HTMLResponse)
def alert_page(request: Request, alert_id: int, session: DbSession, page: Page) -> HTMLResponse:
    try:
        alert = alerts.get_alert(session=session, alert_id=alert_id)
    except alerts.AlertError as exc:
        raise HTTPException(exc.status, detail=str(exc)) from None
    may = of_person(page.principal)
    if not may.sees_alert(alert):
        raise HTTPException(403, detail=f"alert_id: alert {alert_id} is outside your scope")
    store = session.get(Store, alert.store_id)
    context = {
        "alert": alert,
        "store": store,
        "evidence": may.evidence(alert),
        "transitions": alerts.transitions(session=session, alert_id=alert_id),
        "user": page,
    }
    return render(request, "alert.html", context)


@router.post("/alerts/{alert_id}/{action}", response_model=None)
async def alert_action(request: Request, alert_id: int, action: str, page: Page) -> Response:
    """Acknowledge or resolve from the region or alert page; back to where the form was."""
    if action not in ("acknowledge", "resolve"):
        raise HTTPException(404)
    form = await request.form()
    check_csrf(page, str(form.get("csrf_token") or ""))
    note = str(form.get("note") or "").strip() or None
    back = str(form.get("back") or f"/alerts/{alert_id}")
    engine = request.app.state.engine

    def run() -> Response:
        with session_scope(engine) as session:
            try:
                alert = alerts.get_alert(session=session, alert_id=alert_id)
                may = of_person(page.principal)
                if not may.sees_alert(alert) or not may.may_act_on_alert(alert):
                    raise HTTPException(403, detail=f"alert_id: you may not {action} alert {alert_id}")
                change = alerts.acknowledge if action == "acknowledge" else alerts.resolve
                change(session=session, alert_id=alert_id, user_id=page.principal.user_id, note=note)
            except alerts.AlertError as exc:
                raise HTTPException(exc.status, detail=str(exc)) from None
        target = back if back.startswith("/") and not back.startswith("//") else f"/alerts/{alert_id}"
        return RedirectResponse(target, status_code=303)

    return await run_in_threadpool(run)
