"""The morning meeting report (晨会) and the chain ranking: pages and XLSX / CSV exports.

Headquarters and admins see every store; a supervisor the own region's stores. Store people
use their store page instead (403 here).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from dashboard.auth import Page
from dashboard.deps import DbSession
from dashboard.permissions import of_person
from dashboard.rankings import (
    EXCEPTION_BELOW,
    NAMES,
    RATIO_KEYS,
    SORT_KEYS,
    StoreRank,
    exceptions,
    morning_day,
    sort_ranking,
    store_ranking,
    to_csv,
    to_xlsx,
)
from dashboard.rendering import render, translator_of
from ingest.models import Store
from ingest.users import Principal

router = APIRouter(include_in_schema=False)


def visible_store_ids(session: DbSession, principal: Principal) -> list[str] | None:
    """None for the whole chain; the own region's stores for a supervisor; 403 for store people."""
    may = of_person(principal)
    if not may.sees_chain:
        raise HTTPException(403, detail="the morning report and the ranking are for supervisors and headquarters")
    region_id = may.scope().region_id
    if region_id is None:
        return None
    return list(session.scalars(select(Store.store_id).where(Store.region_id == region_id)))


def _report(
    request: Request, session: DbSession, page: Page, day: date | None, sort: str, ascending: bool
) -> tuple[date, list[StoreRank]]:
    timezone = request.app.state.settings.timezone
    day = day or morning_day(timezone)
    store_ids = visible_store_ids(session, page.principal)
    rows = sort_ranking(
        store_ranking(session=session, first=day, last=day, timezone=timezone, store_ids=store_ids), sort, not ascending
    )
    return day, rows


@router.get("/reports/morning", response_class=HTMLResponse)
def morning_report(
    request: Request,
    session: DbSession,
    page: Page,
    day: date | None = None,
    sort: Annotated[str, Query(pattern="^[a-z_]+$")] = "sales",
    ascending: bool = False,
) -> HTMLResponse:
    """Yesterday per store, ranked, with the exceptions written out; printable."""
    day, rows = _report(request, session, page, day, sort, ascending)
    t = translator_of(request)
    context = {
        "user": page, "day": day, "rows": rows, "sort": sort, "ascending": ascending, "sort_keys": SORT_KEYS,
        "ratio_keys": RATIO_KEYS, "names": NAMES, "bars": EXCEPTION_BELOW, "exceptions": exceptions(rows, t.lang),
        "previous_day": day - timedelta(days=1), "next_day": day + timedelta(days=1),
    }  # fmt: skip
    return render(request, "morning.html", context)


@router.get("/reports/morning.xlsx")
def morning_report_xlsx(
    request: Request, session: DbSession, page: Page, day: date | None = None, sort: str = "sales"
) -> Response:
    day, rows = _report(request, session, page, day, sort, False)
    lang = translator_of(request).lang
    body = to_xlsx(rows, exceptions(rows, lang), day, lang)
    return Response(
        body,
        media_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        headers={"Content-Disposition": f'attachment; filename="storepulse-morning-{day.isoformat()}.xlsx"'},
    )


@router.get("/reports/morning.csv")
def morning_report_csv(
    request: Request, session: DbSession, page: Page, day: date | None = None, sort: str = "sales"
) -> Response:
    day, rows = _report(request, session, page, day, sort, False)
    return Response(
        to_csv(rows, translator_of(request).lang),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="storepulse-morning-{day.isoformat()}.csv"'},
    )
