"""Rendering the pages: the Jinja templates, the request's language and the permissions templates ask.

Its own module so that sign-in (`dashboard.auth`) and the pages can both render without
importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from dashboard.i18n import COOKIE, Translator, choose_language, normalise_language
from dashboard.permissions import of_person
from ingest.users import PageSession

TEMPLATES_DIR = Path(__file__).parent / "templates"
REFRESH_MS = 3000

templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
)


def translator_of(request: Request) -> Translator:
    return Translator(
        choose_language(
            request.query_params.get("lang"), request.cookies.get(COOKIE), request.headers.get("accept-language")
        )
    )


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """A page in the request's language; `context["user"]` is the signed-in page session or None.

    Templates get `may`, the person's permissions (None when nobody is signed in).
    """
    t = translator_of(request)
    user = context.get("user")
    may = of_person(user.principal) if isinstance(user, PageSession) else None
    response = templates.TemplateResponse(
        request,
        template,
        {"t": t, "path": request.url.path, "refresh_ms": REFRESH_MS, "may": may, **context},
        status_code=status_code,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
    # ?lang= is a switch: remember it for the next pages and for the live fragments.
    chosen = normalise_language(request.query_params.get("lang"))
    if chosen is not None and chosen != request.cookies.get(COOKIE):
        response.set_cookie(COOKIE, chosen, max_age=365 * 24 * 3600, samesite="lax")
    return response
