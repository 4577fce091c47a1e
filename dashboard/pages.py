"""HTML pages (Jinja, autoescaped): the chain overview and a store's today, with live fragments.

The full pages embed a fragment (``/live``, ``/stores/{id}/live``) that ``static/live.js``
fetches again every few seconds, so the figures move without a reload and without any
JavaScript framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

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


def _render(request: Request, template: str, context: dict[str, Any], *, status_code: int = 200) -> HTMLResponse:
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


@router.get("/", response_class=HTMLResponse)
def chain_page(request: Request, session: DbSession) -> HTMLResponse:
    """Every region and store with today's figures."""
    chain = chain_today(session=session, timezone=request.app.state.settings.timezone)
    return _render(request, "chain.html", {"chain": chain})


@router.get("/live", response_class=HTMLResponse)
def chain_live(request: Request, session: DbSession) -> HTMLResponse:
    """The chain table alone, for the page to refresh itself."""
    chain = chain_today(session=session, timezone=request.app.state.settings.timezone)
    return _render(request, "_chain_live.html", {"chain": chain})


@router.get("/stores/{store_id}", response_class=HTMLResponse)
def store_page(request: Request, store_id: str, session: DbSession) -> HTMLResponse:
    """A store's business day so far: figures, hours and the latest receipts."""
    today = store_today(session=session, store_id=store_id)
    if today is None:
        return _render(request, "404.html", {"store_id": store_id}, status_code=404)
    return _render(request, "store.html", {"today": today})


@router.get("/stores/{store_id}/live", response_class=HTMLResponse)
def store_live(request: Request, store_id: str, session: DbSession) -> HTMLResponse:
    """The changing part of the store page, as an HTML fragment."""
    today = store_today(session=session, store_id=store_id)
    if today is None:
        return _render(request, "_not_found.html", {"store_id": store_id}, status_code=404)
    return _render(request, "_store_live.html", {"today": today})
