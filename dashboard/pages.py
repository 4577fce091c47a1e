"""HTML pages (Jinja, autoescaped): the chain overview and a store's today, with live fragments.

The full pages embed a fragment (``/live``, ``/stores/{id}/live``) that ``static/live.js``
fetches again every few seconds, so the figures move without a reload and without any
JavaScript framework. Every page needs a signed-in person and shows only what the role may
see: a store's people their store, a supervisor the own region in full and the other regions
as totals, headquarters and admins the chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dashboard.auth import Page
from dashboard.deps import DbSession
from dashboard.i18n import COOKIE, Translator, choose_language, normalise_language
from dashboard.store_today import chain_today, store_today

TEMPLATES_DIR = Path(__file__).parent / "templates"
REFRESH_MS = 3000

router = APIRouter(include_in_schema=False)

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
)


def _translator(request: Request) -> Translator:
    return Translator(
        choose_language(
            request.query_params.get("lang"), request.cookies.get(COOKIE), request.headers.get("accept-language")
        )
    )


def render(request: Request, template: str, context: dict[str, Any], *, status_code: int = 200) -> HTMLResponse:
    """A page in the request's language; `context["user"]` is the signed-in page session or None."""
    t = _translator(request)
    response = templates.TemplateResponse(
        request,
        template,
        {"t": t, "path": request.url.path, "refresh_ms": REFRESH_MS, **context},
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )
    # ?lang= is a switch: remember it for the next pages and for the live fragments.
    chosen = normalise_language(request.query_params.get("lang"))
    if chosen is not None and chosen != request.cookies.get(COOKIE):
        response.set_cookie(COOKIE, chosen, max_age=365 * 24 * 3600, samesite="lax")
    return response


@router.get("/", response_model=None)
def chain_page(request: Request, session: DbSession, page: Page) -> Response:
    """Every region and store with today's figures; a store's people go to their store."""
    if not page.principal.chain_wide and page.principal.role != "supervisor":
        return RedirectResponse(f"/stores/{page.principal.store_id}", status_code=303)
    chain = chain_today(session=session, timezone=request.app.state.settings.timezone)
    return render(request, "chain.html", {"chain": chain, "user": page})


@router.get("/live", response_class=HTMLResponse)
def chain_live(request: Request, session: DbSession, page: Page) -> HTMLResponse:
    """The chain table alone, for the page to refresh itself."""
    if not page.principal.chain_wide and page.principal.role != "supervisor":
        raise HTTPException(403, detail="the chain overview is for supervisors and headquarters")
    chain = chain_today(session=session, timezone=request.app.state.settings.timezone)
    return render(request, "_chain_live.html", {"chain": chain, "user": page})


def _store_view(
    request: Request, page: Page, store_id: str, session: DbSession, template: str, fragment: bool
) -> HTMLResponse:
    """A store's page or live fragment, if the store exists and is in the person's scope."""
    today = store_today(session=session, store_id=store_id)
    if today is None:
        missing = "_not_found.html" if fragment else "404.html"
        return render(request, missing, {"store_id": store_id, "user": page}, status_code=404)
    if not page.principal.sees_store(today.store.store_id, today.store.region_id):
        refused = "_forbidden.html" if fragment else "403.html"
        return render(request, refused, {"store_id": store_id, "user": page}, status_code=403)
    return render(request, template, {"today": today, "user": page})


@router.get("/stores/{store_id}", response_class=HTMLResponse)
def store_page(request: Request, store_id: str, session: DbSession, page: Page) -> HTMLResponse:
    """A store's business day so far: figures, hours and the latest receipts."""
    return _store_view(request, page, store_id, session, "store.html", fragment=False)


@router.get("/stores/{store_id}/live", response_class=HTMLResponse)
def store_live(request: Request, store_id: str, session: DbSession, page: Page) -> HTMLResponse:
    """The changing part of the store page, as an HTML fragment."""
    return _store_view(request, page, store_id, session, "_store_live.html", fragment=True)
