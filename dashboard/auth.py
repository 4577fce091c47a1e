"""Signing in to the pages: the login form, page sessions in cookies, CSRF tokens, logout.

The session cookie is HttpOnly and SameSite=Lax, Secure behind TLS (the request's scheme or
`X-Forwarded-Proto`, or STOREPULSE_COOKIE_SECURE), and a new one is issued at every login.
Every form that changes state carries the session's CSRF token; the login form itself uses a
double-submit token (a cookie and a hidden field that must match). Nothing changes on GET.

A refused sign-in never tells why: an unknown user, a wrong password, a locked or a disabled
account all get the same page (the lockout is per account, `ingest.users`). Beside it, each
client address may try `STOREPULSE_LOGIN_RATE_LIMIT` times (default 20 a minute); beyond that
the answer is 429 with Retry-After. The address is the connection's peer: uvicorn replaces it
with X-Forwarded-For only when the peer is a trusted proxy (FORWARDED_ALLOW_IPS, by default
loopback), so a client cannot pick its own address. X-Forwarded-Proto is trusted the same way
for the Secure flag, where a forged value could only make the sender's own cookie stricter.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import Engine

from dashboard.deps import get_db_engine
from dashboard.rendering import render
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
    """The client's address: the peer, or what a trusted proxy forwarded (uvicorn's proxy headers)."""
    return request.client.host if request.client else None


class LoginThrottle:
    """Sign-in attempts per client address, in a moving window kept in this process's memory."""

    def __init__(self, rate: str) -> None:
        self.rate = parse(rate)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def attempt(self, address: str) -> float | None:
        """Count one attempt; None when allowed, else the seconds until the next one is."""
        if self._limiter.hit(self.rate, "login", address):
            return None
        reset_at = self._limiter.get_window_stats(self.rate, "login", address).reset_time
        return max(reset_at - time.time(), 1.0)


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


def _login_form(
    request: Request, *, error: str | None = None, status_code: int = 200, headers: dict[str, str] | None = None
) -> HTMLResponse:
    csrf = secrets.token_urlsafe(32)
    next_path = safe_next(request.query_params.get("next"))
    response = render(
        request, "login.html", {"csrf_token": csrf, "next": next_path, "error": error, "user": None},
        status_code=status_code, headers=headers,
    )  # fmt: skip
    response.set_cookie(
        LOGIN_CSRF_COOKIE, csrf, max_age=3600, httponly=True, samesite="strict", secure=secure_cookies(request)
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _login_form(request)


def _login(engine: Engine, user_id: str, password: str, ip: str | None) -> str | None:
    with session_scope(engine) as session:
        return login(session=session, user_id=user_id, password=password, ip=ip).session_token


@router.post("/login", response_model=None)
async def login_submit(
    request: Request,
    user_id: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    retry_after = request.app.state.login_throttle.attempt(client_ip(request) or "unknown")
    if retry_after is not None:
        wait = str(math.ceil(retry_after))
        return _login_form(request, error="login_throttled", status_code=429, headers={"Retry-After": wait})
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not csrf_token or not secrets.compare_digest(expected, csrf_token):
        return _login_form(request, error="login_csrf", status_code=403)
    token = await run_in_threadpool(_login, request.app.state.engine, user_id.strip(), password, client_ip(request))
    if token is None:
        # The same answer whatever the reason, so the form does not tell which accounts exist.
        return _login_form(request, error="login_refused", status_code=401)
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
