"""HTML pages (Jinja, autoescaped): the chain overview and a store's today, with live fragments.

The full pages embed a fragment (``/live``, ``/stores/{id}/live``) that ``static/live.js``
fetches again every few seconds, so the figures move without a reload and without any
JavaScript framework. Every page needs a signed-in person and shows only what the role may
see: a store's people their store, a supervisor the own region in full and the other regions
as totals, headquarters and admins the chain.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from dashboard.auth import Page, check_csrf
from dashboard.deps import DbSession, Now
from dashboard.permissions import PersonPermissions, of_person
from dashboard.promotions import publish_store
from dashboard.rankings import (
    NAMES,
    RATIO_KEYS,
    SORT_KEYS,
    by_region,
    daily_series,
    morning_day,
    sort_ranking,
    store_ranking,
)
from dashboard.rendering import render
from dashboard.store_today import chain_today, store_today
from ingest.db import session_scope
from ingest.models import Staff, Store
from ingest.users import PageSession
from store_rules.definitions import cached_skus
from store_rules.metrics import Ratio, prompt_answer_distribution, staff_compliance
from store_rules.promotions import service as promotions
from store_rules.promotions.templates import plain, stored_template
from store_rules.rollups import store_day_values
from store_rules.stock import stock_risks

PERIODS = (7, 30, 90)

router = APIRouter(include_in_schema=False)


@router.get("/", response_model=None)
def chain_page(request: Request, session: DbSession, page: Page) -> Response:
    """Every region and store with today's figures; a store's people go to their store."""
    if not of_person(page.principal).sees_chain:
        return RedirectResponse(f"/stores/{of_person(page.principal).home_store_id}", status_code=303)
    timezone = request.app.state.settings.timezone
    chain = chain_today(session=session, timezone=timezone)
    return render(request, "chain.html", {"chain": chain, "user": page, **chain_period(request, session, page)})


def chain_period(request: Request, session: Session, page: PageSession) -> dict[str, Any]:
    """KPIs, stores ranked, regions compared and the daily trend over the last 7, 30 or 90 closed days."""
    timezone = request.app.state.settings.timezone
    try:
        days = int(request.query_params.get("days", "7"))
    except ValueError:
        days = 7
    period = days if days in PERIODS else 7
    sort = request.query_params.get("sort", "sales")
    ascending = request.query_params.get("ascending") == "true"
    last = morning_day(timezone)
    first = last - timedelta(days=period - 1)
    # The rollups of the period are read once, for the ranking and for the trend.
    stores = list(session.scalars(select(Store).where(Store.active.is_(True))))
    days_in_period = [first + timedelta(days=n) for n in range(period)]
    values = store_day_values(session=session, stores=stores, days=days_in_period)
    everything = store_ranking(session=session, first=first, last=last, timezone=timezone, values=values)
    may = of_person(page.principal)
    mine = [r for r in everything if may.sees_store(r.store.store_id, r.store.region_id)]
    store_ids = None if may.chain_wide else [r.store.store_id for r in mine]
    series = daily_series(
        session=session, first=first, last=last, timezone=timezone, store_ids=store_ids, values=values
    )
    return {
        "period_days": period, "periods": PERIODS, "period_first": first, "period_last": last,
        "ranking": sort_ranking(mine, sort, not ascending), "sort": sort, "ascending": ascending,
        "sort_keys": SORT_KEYS, "ratio_keys": RATIO_KEYS, "names": NAMES,
        "regions_compared": by_region(everything), "series": series,
        "period_kpis": {
            "sales": sum((r.sales for r in mine), Decimal(0)),
            "transactions": sum(r.transactions for r in mine),
            "visitors": sum(r.visitors for r in mine),
            "conversion": Ratio(
                sum(r.ratios["conversion_rate"].numerator for r in mine),
                sum(r.ratios["conversion_rate"].denominator for r in mine),
            ),
        },
    }  # fmt: skip


@router.get("/live", response_class=HTMLResponse)
def chain_live(request: Request, session: DbSession, page: Page) -> HTMLResponse:
    """The chain table alone, for the page to refresh itself."""
    if not of_person(page.principal).sees_chain:
        raise HTTPException(403, detail="the chain overview is for supervisors and headquarters")
    chain = chain_today(session=session, timezone=request.app.state.settings.timezone)
    return render(request, "_chain_live.html", {"chain": chain, "user": page})


def _store_view(
    request: Request,
    page: Page,
    store_id: str,
    session: DbSession,
    template: str,
    fragment: bool,
    *,
    now: datetime,
    message: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A store's page or live fragment, if the store exists and is in the person's scope."""
    today = store_today(session=session, store_id=store_id, now=now)
    if today is None:
        missing = "_not_found.html" if fragment else "404.html"
        return render(request, missing, {"store_id": store_id, "user": page}, status_code=404)
    may = of_person(page.principal)
    store = today.store
    if not may.sees_store(store.store_id, store.region_id):
        refused = "_forbidden.html" if fragment else "403.html"
        return render(request, refused, {"store_id": store_id, "user": page}, status_code=403)
    if not may.sees_customer_names(store.store_id, store.region_id):
        latest = [
            dataclasses.replace(r, member_name=may.member_name(r.member_name, store.store_id, store.region_id))
            for r in today.latest
        ]
        today = dataclasses.replace(today, latest=latest)
    context: dict[str, Any] = {"today": today, "user": page, "message": message}
    if not fragment:
        context.update(store_panels(session, today.store, may, now=now))
    return render(request, template, context, status_code=status_code)


def store_panels(session: Session, store: Store, may: PersonPermissions, *, now: datetime) -> dict[str, Any]:
    """The manager's panels: drafts to decide, active promotions with the tills' versions, stock risks."""
    pending = []
    for promotion in promotions.list_promotions(session=session, status="pending", store_ids=[store.store_id]):
        template = stored_template(
            session=session, template_id=promotion.template_id, version=promotion.template_version
        )
        specs = template.params if template else {}
        params = [
            {"name": name, "value": value, "min": plain(specs[name].min), "max": plain(specs[name].max),
             "step": "1" if specs[name].integer else "any"}
            for name, value in promotion.params.items() if name in specs
        ]  # fmt: skip
        pending.append({"promotion": promotion, "params": params})
    active = []
    for promotion in promotions.list_promotions(session=session, status="active", store_ids=[store.store_id]):
        rate = promotions.execution(session=session, promotion=promotion).ratio
        missing = promotions.tills_never_acknowledged(session=session, promotion=promotion)
        active.append({"promotion": promotion, "rate": rate, "never_acked": missing})
    today = now.astimezone(ZoneInfo(store.timezone)).date()
    staff_names = dict(
        session.execute(select(Staff.staff_id, Staff.name).where(Staff.store_id == store.store_id)).all()
    )
    prompt_answers = prompt_answer_distribution(session=session, store_id=store.store_id, day=today).prompts
    return {
        "staff_compliance": staff_compliance(session=session, store_id=store.store_id, day=today),
        "staff_names": staff_names,
        "prompt_answers": prompt_answers,
        # Only the answered SKUs, from the counter's per-process SKU cache (not the whole catalogue).
        "sku_names": cached_skus(session, {d.sku for d in prompt_answers}),
        "may_decide": may.may_decide_for_store(store.store_id),
        "pending": pending,
        "active": active,
        "set_version": promotions.current_set(session=session, store_id=store.store_id)["version"],
        "tills": promotions.till_deliveries(session=session, store_id=store.store_id),
        "risks": stock_risks(session=session, store=store, now=now),
    }


def _decide(store_id: str, promotion_id: str, page: PageSession, session: Session, action: str, form: Any) -> None:
    promotion = promotions.get_promotion(session=session, promotion_id=promotion_id)
    may = of_person(page.principal)
    if promotion.store_id != store_id or not may.sees_promotion(promotion) or not may.may_decide_promotion(promotion):
        raise HTTPException(403, detail=f"promotion_id: you may not decide promotion {promotion_id}")
    user_id = page.principal.user_id
    if action == "approve":
        edits = {k.removeprefix("p_"): v for k, v in form.items() if k.startswith("p_") and v != ""}
        promotions.approve(session=session, promotion_id=promotion_id, user_id=user_id, params=edits)
    else:
        reason = str(form.get("reason") or "")
        promotions.reject(session=session, promotion_id=promotion_id, user_id=user_id, reason=reason)


@router.post("/stores/{store_id}/promotions/{promotion_id}/{action}", response_model=None)
async def store_promotion_decision(
    request: Request, store_id: str, promotion_id: str, action: str, page: Page, now: Now
) -> HTMLResponse | RedirectResponse:
    """Approve (with the parameters of the form) or reject (with a reason) in one click from the store page."""
    if action not in ("approve", "reject"):
        raise HTTPException(404)
    form = await request.form()
    check_csrf(page, str(form.get("csrf_token") or ""))
    engine = request.app.state.engine

    def run() -> HTMLResponse | RedirectResponse:
        try:
            with session_scope(engine) as session:
                _decide(store_id, promotion_id, page, session, action, form)
        except promotions.PromotionError as exc:
            with session_scope(engine) as session:
                return _store_view(
                    request,
                    page,
                    store_id,
                    session,
                    "store.html",
                    False,
                    now=now,
                    message=str(exc),
                    status_code=exc.status,
                )
        if action == "approve":
            publish_store(request, store_id)
        return RedirectResponse(f"/stores/{store_id}?done={action}#promotions", status_code=303)

    return await run_in_threadpool(run)


@router.get("/stores/{store_id}", response_class=HTMLResponse)
def store_page(request: Request, store_id: str, session: DbSession, page: Page, now: Now) -> HTMLResponse:
    """A store's business day so far: figures, hours and the latest receipts."""
    return _store_view(request, page, store_id, session, "store.html", fragment=False, now=now)


@router.get("/stores/{store_id}/live", response_class=HTMLResponse)
def store_live(request: Request, store_id: str, session: DbSession, page: Page, now: Now) -> HTMLResponse:
    """The changing part of the store page, as an HTML fragment."""
    return _store_view(request, page, store_id, session, "_store_live.html", fragment=True, now=now)
