"""Signing in to the pages: passwords, lockout, throttle, session cookies, CSRF, scope of the pages, audit.

Real uvicorn on loopback, the real login form, on SQLite and TimescaleDB; parallel guesses on
real parallel connections.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest import audit
from ingest.db import session_scope
from ingest.models import User
from ingest.users import MAX_FAILURES, LoginResult, disable_user, login
from tests.conftest import LiveServer, create_people, make_app, sign_in

PASSWORD = "correct horse battery"
REFUSED_ZH = "无法登录：用户名或密码不正确，或账户因多次输错已暂时锁定（15 分钟）。"
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
            assert refused.status_code == 401 and REFUSED_ZH in refused.text
        locked = post_login(client, "sup-zj", "wrong password")
        assert locked.status_code == 401 and REFUSED_ZH in locked.text
        # While locked even the right password is refused, and the failure does not say more.
        assert REFUSED_ZH in post_login(client, "sup-zj", PASSWORD).text
        assert REFUSED_ZH in post_login(client, "nobody", PASSWORD).text
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


def without_tokens(html: str) -> str:
    return re.sub(r'name="csrf_token" value="[^"]+"', 'name="csrf_token" value=""', html)


def test_a_refusal_does_not_tell_whether_the_account_exists(server: LiveServer, chain: Engine) -> None:
    with session_scope(chain) as session:
        assert disable_user(session=session, user_id="mgr-s002")
    refusals = {}
    with httpx.Client(base_url=server.url, headers={"Accept-Language": "en"}) as client:
        for _ in range(MAX_FAILURES):
            post_login(client, "sup-zj", "wrong password")
        refusals["locked, right password"] = post_login(client, "sup-zj", PASSWORD)
        refusals["locked, wrong password"] = post_login(client, "sup-zj", "another wrong one")
        refusals["wrong password"] = post_login(client, "staff-s001", "wrong password")
        refusals["unknown user"] = post_login(client, "no-such-user", PASSWORD)
        refusals["disabled"] = post_login(client, "mgr-s002", PASSWORD)
        refusals["empty"] = post_login(client, "", "")
    message = "Could not sign in: wrong user name or password, or the account is locked for 15 minutes"
    assert {why: r.status_code for why, r in refusals.items()} == dict.fromkeys(refusals, 401)
    assert all(message in r.text and "sp_session" not in r.cookies for r in refusals.values())
    pages = {why: without_tokens(r.text) for why, r in refusals.items()}
    assert len(set(pages.values())) == 1, {why: page[-400:] for why, page in pages.items()}


def run_in_parallel(count: int, attempt: Callable[[int], Any]) -> list[Any]:
    """`attempt(i)` on `count` threads released together by a barrier; the results in thread order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = attempt(i)
        except BaseException as exc:  # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return results


def assert_locked_exactly_at_the_threshold(chain: Engine, user_id: str, attempts: int) -> None:
    """Of simultaneous wrong passwords, failures 1..MAX_FAILURES are counted, the last locks, the rest are refused."""
    with session_scope(chain) as session:
        user = session.get(User, user_id)
        assert user is not None and user.locked_until is not None
        assert user.locked_until > datetime.now(UTC) + timedelta(minutes=14) and user.failed_logins == 0
        logins = ("login", "login_failed", "login_locked")
        trail = list(reversed(audit.entries(session=session, actions=logins, actor=user_id, limit=1000)))
        failed = [e.detail for e in trail if e.action == "login_failed"]
        assert len(trail) == attempts and [e.action for e in trail if e.action != "login_failed"] == [
            "login_locked"
        ] * (attempts - MAX_FAILURES)
        assert sorted(d["failures"] for d in failed) == list(range(1, MAX_FAILURES + 1))
        assert [d["failures"] for d in failed if "locked_until" in d] == [MAX_FAILURES]
        # Nothing was counted after the lock, and the right password is refused until it ends.
        assert login(session=session, user_id=user_id, password=PASSWORD).refused == "locked"
        later = login(
            session=session, user_id=user_id, password=PASSWORD, now=datetime.now(UTC) + timedelta(minutes=16)
        )
        assert later.principal is not None and later.principal.user_id == user_id


def test_twenty_parallel_wrong_passwords_lock_the_account_exactly_at_the_threshold(chain: Engine) -> None:
    create_people(chain, {"sup-zj": PEOPLE["sup-zj"]}, PASSWORD)

    def guess(i: int) -> LoginResult:
        with session_scope(chain) as session:  # each guess on its own connection and transaction
            return login(session=session, user_id="sup-zj", password=f"wrong password {i}", ip="198.51.100.7")

    results = run_in_parallel(20, guess)
    assert sorted(r.refused for r in results) == ["invalid"] * (MAX_FAILURES - 1) + ["locked"] * (21 - MAX_FAILURES)
    assert_locked_exactly_at_the_threshold(chain, "sup-zj", 20)


def test_twenty_parallel_wrong_passwords_on_the_login_form_lock_exactly_at_the_threshold(chain: Engine) -> None:
    create_people(chain, {"sup-zj": PEOPLE["sup-zj"]}, PASSWORD)
    with LiveServer(make_app(chain)) as live:
        clients = [httpx.Client(base_url=live.url, timeout=60) for _ in range(20)]
        try:
            tokens = [csrf_of(c.get("/login").text) for c in clients]

            def guess(i: int) -> int:
                data = {"user_id": "sup-zj", "password": f"wrong {i}", "csrf_token": tokens[i]}
                return clients[i].post("/login", data=data).status_code

            # 20 attempts from one address: exactly the default throttle, so every one reaches the account.
            assert run_in_parallel(20, guess) == [401] * 20
        finally:
            for client in clients:
                client.close()
    assert_locked_exactly_at_the_threshold(chain, "sup-zj", 20)


def test_too_many_attempts_from_one_address_get_429_in_the_persons_language(chain: Engine) -> None:
    create_people(chain, PEOPLE, PASSWORD)
    with LiveServer(make_app(chain, login_rate_limit="3/minute")) as live:
        # uvicorn takes the client address from X-Forwarded-For only when the peer is a trusted proxy
        # (FORWARDED_ALLOW_IPS, loopback by default), as the test client on 127.0.0.1 is here.
        first = {"X-Forwarded-For": "203.0.113.10", "Accept-Language": "zh-CN"}
        with httpx.Client(base_url=live.url, headers=first) as client:
            assert [post_login(client, "sup-zj", "wrong password").status_code for _ in range(3)] == [401] * 3
            throttled = post_login(client, "sup-zj", PASSWORD)  # even the right password
            assert throttled.status_code == 429 and "sp_session" not in client.cookies
            assert "此地址的登录尝试过于频繁，请稍后再试。" in throttled.text
            assert 1 <= int(throttled.headers["retry-after"]) <= 60
        english = {"X-Forwarded-For": "203.0.113.10", "Accept-Language": "en"}
        with httpx.Client(base_url=live.url, headers=english) as client:
            refused = post_login(client, "hq", PASSWORD)
            assert refused.status_code == 429
            assert "Too many sign-in attempts from this address; please wait a minute and try again." in refused.text
        # Another address is not held up, and the account was not locked by the throttled attempts.
        with httpx.Client(base_url=live.url, headers={"X-Forwarded-For": "203.0.113.11"}) as client:
            assert post_login(client, "sup-zj", PASSWORD).status_code == 303
    with session_scope(chain) as session:
        logins = ("login", "login_failed", "login_locked")
        trail = [(e.action, e.ip) for e in reversed(audit.entries(session=session, actions=logins, actor="sup-zj"))]
        assert trail == [("login_failed", "203.0.113.10")] * 3 + [("login", "203.0.113.11")]
