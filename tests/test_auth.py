"""Signing in to the pages: passwords, lockout, session cookies, CSRF, scope of the pages, audit.

Real uvicorn on loopback, the real login form, on SQLite and TimescaleDB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest import audit
from ingest.db import session_scope
from ingest.models import User
from ingest.users import MAX_FAILURES, disable_user, login
from tests.conftest import LiveServer, create_people, make_app, sign_in

PASSWORD = "correct horse battery"
PEOPLE = {
    "staff-s001": ("staff", {"store_id": "S001"}),
    "mgr-s002": ("manager", {"store_id": "S002"}),
    "sup-zj": ("supervisor", {"region_id": "R-ZJ"}),
    "hq": ("headquarters", {}),
}


@pytest.fixture
def server(chain: Engine) -> Iterator[LiveServer]:
    create_people(chain, PEOPLE, PASSWORD)
    with LiveServer(make_app(chain)) as live:
        yield live


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:300]
    return match.group(1)


def post_login(client: httpx.Client, user_id: str, password: str, **extra: str) -> httpx.Response:
    csrf = csrf_of(client.get("/login").text)
    return client.post("/login", data={"user_id": user_id, "password": password, "csrf_token": csrf, **extra})


def test_login_sets_a_new_httponly_samesite_session_cookie(server: LiveServer, chain: Engine) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/").status_code == 303 and client.get("/").headers["location"] == "/login?next=/"
        client.cookies.set("sp_session", "planted-by-an-attacker", domain="127.0.0.1", path="/")
        response = post_login(client, "hq", PASSWORD)
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
        first = client.cookies["sp_session"]
        assert first != "planted-by-an-attacker"
        assert client.get("/").status_code == 200
        again = post_login(client, "hq", PASSWORD)
        assert client.cookies["sp_session"] != first  # every login issues a new session
        assert again.status_code == 303
    with httpx.Client(base_url=server.url, headers={"X-Forwarded-Proto": "https"}) as client:
        assert "Secure" in post_login(client, "hq", PASSWORD).headers["set-cookie"]
    with session_scope(chain) as session:
        stored = session.get(User, "hq")
        assert stored is not None and stored.password_hash is not None
        assert stored.password_hash.startswith("$argon2id$") and PASSWORD not in stored.password_hash


def test_wrong_passwords_lock_the_account_and_everything_is_audited(server: LiveServer, chain: Engine) -> None:
    with httpx.Client(base_url=server.url, headers={"Accept-Language": "zh-CN"}) as client:
        for _ in range(MAX_FAILURES - 1):
            refused = post_login(client, "sup-zj", "wrong password")
            assert refused.status_code == 401 and "用户名或密码不正确" in refused.text
        locked = post_login(client, "sup-zj", "wrong password")
        assert locked.status_code == 401 and "账户已暂时锁定" in locked.text
        # While locked even the right password is refused, and the failure does not say more.
        assert "账户已暂时锁定" in post_login(client, "sup-zj", PASSWORD).text
        assert "用户名或密码不正确" in post_login(client, "nobody", PASSWORD).text
    with session_scope(chain) as session:
        actions = [(e.actor, e.action) for e in reversed(audit.entries(session=session))]
        assert actions[-(MAX_FAILURES + 2) :] == [
            *[("sup-zj", "login_failed")] * MAX_FAILURES, ("sup-zj", "login_locked"), ("nobody", "login_failed"),
        ]  # fmt: skip
        # After the lockout the right password works again.
        later = login(
            session=session, user_id="sup-zj", password=PASSWORD, now=datetime.now(UTC) + timedelta(minutes=16)
        )
        assert later.principal is not None and later.principal.role == "supervisor"


def test_forms_need_their_csrf_token_and_get_changes_nothing(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        client.get("/login")
        forged = client.post("/login", data={"user_id": "hq", "password": PASSWORD, "csrf_token": "guess"})
        assert forged.status_code == 403 and "sp_session" not in client.cookies
    client = sign_in(server.url, "hq", PASSWORD)
    with closing(client):
        assert client.get("/logout").status_code == 405  # signing out is a POST with the token
        assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
        assert client.get("/").status_code == 200
        token = csrf_of(client.get("/").text)
        assert client.post("/logout", data={"csrf_token": token}).status_code == 303
        client.cookies.clear()
    # The old cookie is dead on the server too, not only deleted in the browser.
    stale = sign_in(server.url, "hq", PASSWORD)
    cookie = stale.cookies["sp_session"]
    stale.post("/logout", data={"csrf_token": csrf_of(stale.get("/").text)})
    with httpx.Client(base_url=server.url, cookies={"sp_session": cookie}) as replay:
        assert replay.get("/").status_code == 303


def test_each_role_sees_only_its_scope(server: LiveServer, chain: Engine) -> None:
    with closing(sign_in(server.url, "mgr-s002", PASSWORD)) as manager:
        home = manager.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/stores/S002"
        assert manager.get("/stores/S002").status_code == 200
        assert manager.get("/stores/S001").status_code == 403
        assert manager.get("/stores/S001/live").status_code == 403
        assert manager.get("/live").status_code == 403
    with closing(sign_in(server.url, "staff-s001", PASSWORD)) as staff:
        assert staff.get("/stores/S001").status_code == 200 and staff.get("/stores/S003").status_code == 403
    with closing(sign_in(server.url, "sup-zj", PASSWORD, headers={"Accept-Language": "en"})) as supervisor:
        html = supervisor.get("/").text
        assert 'id="store-S001"' in html and 'id="store-S002"' in html
        assert 'id="store-S003"' not in html and 'id="region-R-SH"' in html  # Shanghai: totals only
        assert "Other regions show totals only." in html
        assert supervisor.get("/stores/S003").status_code == 403
    with closing(sign_in(server.url, "hq", PASSWORD)) as hq:
        assert all(f'id="store-{s}"' in hq.get("/").text for s in ("S001", "S002", "S003"))
        with session_scope(chain) as session:
            assert disable_user(session=session, user_id="hq")
        assert hq.get("/").status_code == 303  # disabling signs the person out everywhere


def test_only_local_paths_are_followed_after_login(server: LiveServer, chain: Engine) -> None:
    with httpx.Client(base_url=server.url) as client:
        for target, expected in (
            ("/stores/S001", "/stores/S001"),
            ("//evil.example/x", "/"),
            ("https://evil.example", "/"),
        ):
            assert post_login(client, "hq", PASSWORD, next=target).headers["location"] == expected
        with pytest.raises(AssertionError):
            sign_in(server.url, "hq", "not the password")
    with session_scope(chain) as session:
        assert session.scalar(select(User.failed_logins).where(User.user_id == "hq")) == 1
