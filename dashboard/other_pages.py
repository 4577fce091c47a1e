"""The remaining pages: a receipt's trace, the promotions list, the rules with a back-test form, the audit log.

All of them read; nothing changes on GET (a back-test replays history in memory and notifies nobody).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from dashboard.alerts import list_scope
from dashboard.auth import Page
from dashboard.deps import DbSession
from dashboard.permissions import of_person
from dashboard.rankings import morning_day
from dashboard.rendering import render
from ingest import audit
from ingest.models import Store
from store_rules import counter
from store_rules.alerts.backtest import backtest
from store_rules.alerts.definitions import rule_versions, stored_rule, stored_rules
from store_rules.promotions import service as promotions

router = APIRouter(include_in_schema=False)
STATUSES = ("pending", "active", "rejected", "expired", "retracted", "ended")


@router.get("/stores/{store_id}/receipts/{receipt_id}/trace", response_class=HTMLResponse)
def trace_page(
    request: Request, store_id: str, receipt_id: str, session: DbSession, page: Page, terminal_id: str | None = None
) -> HTMLResponse:
    """A sale followed back to its first contact: consultation steps, prompt answers, lines.

    The customer's name and symptoms as the person may see them (`dashboard.permissions`).
    """
    store = session.get(Store, store_id)
    may = of_person(page.principal)
    if store is None or not may.sees_receipt(store.store_id, store.region_id):
        raise HTTPException(403 if store else 404, detail=f"store_id: store {store_id!r} is not yours to see")
    found = counter.trace(session=session, store_id=store_id, receipt_id=receipt_id, terminal_id=terminal_id)
    if found is None:
        raise HTTPException(404, detail=f"receipt_id: no receipt {receipt_id!r} in store {store_id!r}")
    seen = may.trace(found, store.store_id, store.region_id)
    return render(request, "trace.html", {"trace": seen, "store": store, "user": page})


@router.get("/promotions", response_class=HTMLResponse)
def promotions_page(request: Request, session: DbSession, page: Page, status: str | None = None) -> HTMLResponse:
    """Promotions in the person's scope, newest first, with their execution rate."""
    store_ids, region_id = list_scope(session, page.principal, None)
    may = of_person(page.principal)
    rows = promotions.list_promotions(
        session=session, status=status if status in STATUSES else None, store_ids=store_ids, region_id=region_id
    )
    items = [
        {
            "promotion": p,
            "rate": promotions.execution(session=session, promotion=p).ratio,
            "may_decide": may.may_decide_promotion(p),
        }
        for p in rows
    ]
    return render(request, "promotions.html", {"items": items, "status": status, "statuses": STATUSES, "user": page})


def _rules_reader(page: Page) -> None:
    if not of_person(page.principal).sees_rules:
        raise HTTPException(403, detail="the rules are for supervisors and headquarters")


@router.get("/rules", response_class=HTMLResponse)
def rules_page(request: Request, session: DbSession, page: Page) -> HTMLResponse:
    _rules_reader(page)
    rules = stored_rules(session=session)
    versions = {r.id: rule_versions(session=session, rule_id=r.id) for r in rules}
    return render(request, "rules.html", {"rules": rules, "versions": versions, "user": page})


@router.get("/rules/{rule_id}", response_class=HTMLResponse)
def rule_page(
    request: Request,
    rule_id: str,
    session: DbSession,
    page: Page,
) -> HTMLResponse:
    """One rule, its versions, and a back-test over stored history (GET: it changes nothing)."""
    _rules_reader(page)
    rule = stored_rule(session=session, rule_id=rule_id)
    if rule is None:
        raise HTTPException(404, detail=f"rule_id: no rule {rule_id!r}")
    query = request.query_params
    try:
        last = date.fromisoformat(query["to"]) if query.get("to") else morning_day(request.app.state.settings.timezone)
        first = date.fromisoformat(query["from"]) if query.get("from") else last - timedelta(days=29)
    except ValueError:
        raise HTTPException(422, detail="from/to: expected dates as YYYY-MM-DD") from None
    results: list[Any] | None = None
    error = None
    if query.get("run"):
        if (last - first).days > 366:
            error = "from/to: at most 366 days"
        else:
            try:
                results = backtest(session=session, rule=rule, first=first, last=last)
            except ValueError as exc:
                error = str(exc)
        may = of_person(page.principal)
        if results is not None and not may.chain_wide:
            results = [a for a in results if may.sees_store(a.store_id, _region_of(session, a.store_id))]
    context = {
        "rule": rule, "versions": rule_versions(session=session, rule_id=rule_id), "first": first, "last": last,
        "results": results, "error": error, "user": page,
    }  # fmt: skip
    return render(request, "rule.html", context)


def _region_of(session: DbSession, store_id: str) -> str:
    store = session.get(Store, store_id)
    return store.region_id if store else ""


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: DbSession, page: Page, actor: str | None = None) -> HTMLResponse:
    """The audit log (logins, approvals, acknowledgements, rule changes): admins and headquarters."""
    if not of_person(page.principal).sees_audit_log:
        raise HTTPException(403, detail="the audit log is for admins and headquarters")
    entries = audit.entries(session=session, actor=actor or None, limit=500)
    return render(request, "audit.html", {"entries": entries, "actor": actor or "", "user": page})
