"""Signing in to the pages: the login form, page sessions in cookies, CSRF tokens, logout.

The session cookie is HttpOnly and SameSite=Lax, Secure behind TLS (the request's scheme or
`X-Forwarded-Proto`, or STOREPULSE_COOKIE_SECURE), and a new one is issued at every login.
Every form that changes state carries the session's CSRF token; the login form itself uses a
double-submit token (a cookie and a hidden field that must match). Nothing changes on GET.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine

from dashboard.deps import get_db_engine
from ingest.db import session_scope
from ingest.users import SESSION_TTL, PageSession, login, logout, session_user

SESSION_COOKIE = "sp_session"
LOGIN_CSRF_COOKIE = "sp_login_csrf"

router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    """Raised by page dependencies; the app answers with a redirect to the login form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def secure_cookies(request: Request) -> bool:
    configured = request.app.state.settings.cookie_secure
    if configured is not None:
        return bool(configured)
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _lookup(engine: Engine, token: str) -> PageSession | None:
    with session_scope(engine) as session:
        return session_user(session=session, token=token)


async def optional_page_session(
    request: Request, engine: Annotated[Engine, Depends(get_db_engine)]
) -> PageSession | None:
    token = request.cookies.get(SESSION_COOKIE)
    return await run_in_threadpool(_lookup, engine, token) if token else None


async def page_session(
    request: Request, found: Annotated[PageSession | None, Depends(optional_page_session)]
) -> PageSession:
    if found is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path)
    return found


Page = Annotated[PageSession, Depends(page_session)]


def check_csrf(page: PageSession, submitted: str | None) -> None:
    if not submitted or not secrets.compare_digest(submitted, page.csrf_token):
        raise HTTPException(403, detail="csrf_token: missing or wrong; reload the page and try again")


def safe_next(value: str | None) -> str:
    """Only a path on this site: never an open redirect to another host."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def login_redirect(next_path: str) -> RedirectResponse:
    return RedirectResponse(f"/login?next={quote(next_path, safe='/')}", status_code=303)


def _login_form(request: Request, *, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    from dashboard.pages import render

    csrf = secrets.token_urlsafe(32)
    next_path = safe_next(request.query_params.get("next"))
    response = render(
        request, "login.html", {"csrf_token": csrf, "next": next_path, "error": error, "user": None},
        status_code=status_code,
    )  # fmt: skip
    response.set_cookie(
        LOGIN_CSRF_COOKIE, csrf, max_age=3600, httponly=True, samesite="strict", secure=secure_cookies(request)
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _login_form(request)


def _login(engine: Engine, user_id: str, password: str, ip: str | None) -> tuple[str | None, str | None]:
    with session_scope(engine) as session:
        result = login(session=session, user_id=user_id, password=password, ip=ip)
    if result.session_token is not None:
        return result.session_token, None
    return None, result.refused


@router.post("/login", response_model=None)
async def login_submit(
    request: Request,
    user_id: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not csrf_token or not secrets.compare_digest(expected, csrf_token):
        return _login_form(request, error="login_csrf", status_code=403)
    token, refused = await run_in_threadpool(
        _login, request.app.state.engine, user_id.strip(), password, client_ip(request)
    )
    if token is None:
        return _login_form(request, error="login_locked" if refused == "locked" else "login_invalid", status_code=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(SESSION_TTL.total_seconds()), httponly=True, samesite="lax",
        secure=secure_cookies(request), path="/",
    )  # fmt: skip
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


def _logout(engine: Engine, token: str, ip: str | None) -> None:
    with session_scope(engine) as session:
        logout(session=session, token=token, ip=ip)


@router.post("/logout", response_model=None)
async def logout_submit(
    request: Request, page: Page, csrf_token: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    check_csrf(page, csrf_token)
    token = request.cookies.get(SESSION_COOKIE, "")
    await run_in_threadpool(_logout, request.app.state.engine, token, client_ip(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
