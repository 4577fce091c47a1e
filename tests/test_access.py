"""Access: every page and API route walked as people (and tills) of another store or region.

The routes come from the app itself, so a new route is walked too (and fails this test until
its path parameters are known here). Out of scope means 403 (404 for a thing that does not
exist), or, for the pages that show aggregates, 200 without the other store's detail. No
customer name of S001 reaches anyone outside S001 and its region's supervisor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest.db import session_scope
from ingest.models import Member
from ingest.tokens import create_token
from ingest.users import create_user, set_password
from store_rules.alerts.models import Alert
from store_rules.promotions.templates import load_templates_and_rules
from tests.conftest import LiveServer, make_app, sign_in
from tests.test_alerts import D1, D2, D3, evaluate, scenario, seed_rule
from tests.test_metrics import ingest, sale, step_event
from tests.test_promotions import evaluate as evaluate_stock
from tests.test_promotions import promotions_of, stock_watch_scenario

PASSWORD = "correct horse battery"
SECRET_CUSTOMER = "欧阳锋"  # a consultation of S001
SECRET_MEMBER = "令狐冲"  # a member on a receipt of S001
SECRET_SYMPTOM = "夜间盗汗"  # the symptoms recorded in that consultation
OUTSIDERS = {
    "mgr-s002": ("manager", {"store_id": "S002"}),  # same region, another store
    "staff-s003": ("staff", {"store_id": "S003"}),  # another region
    "sup-sh": ("supervisor", {"region_id": "R-SH"}),  # another region's supervisor
}
INSIDERS = {  # who serve or follow up S001's customers: names and symptoms unmasked
    "staff-s001": ("staff", {"store_id": "S001"}),
    "mgr-s001": ("manager", {"store_id": "S001"}),
    "sup-zj": ("supervisor", {"region_id": "R-ZJ"}),
}
# Everything, with names masked and symptoms withheld.
CHAIN_WIDE: dict[str, tuple[str, dict[str, str]]] = {"hq": ("headquarters", {}), "admin": ("admin", {})}
# Pages where an outsider legitimately gets 200 with aggregates (or only the own scope).
AGGREGATE_PAGES = {
    "/", "/live", "/reports/morning", "/reports/morning.csv", "/reports/morning.xlsx", "/promotions", "/rules",
    "/rules/{rule_id}",
    "/login", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/healthz",
}  # fmt: skip
AGGREGATE_API = {"/api/v1/alerts", "/api/v1/alerts/timeliness", "/api/v1/promotions", "/api/v1/promotions/execution"}


@pytest.fixture
def world(chain: Engine) -> Iterator[dict[str, Any]]:
    stock_watch_scenario(chain)
    evaluate_stock(chain, "stock_watch", now=datetime.now(UTC))
    scenario(chain)
    for day in (D1, D2, D3):
        evaluate(chain, seed_rule(), day, now=datetime.now(UTC))
    now = datetime.now(UTC) - timedelta(minutes=30)
    secret = step_event("C-SECRET", "consultation", now, data=None)
    recorded = {"text": f"{SECRET_SYMPTOM}三周", "keywords": [SECRET_SYMPTOM]}
    symptoms = step_event("C-SECRET", "symptoms", now + timedelta(minutes=1), data=recorded)
    customer = {"member_id": "M-SECRET", "name": SECRET_CUSTOMER}
    ingest(chain, [{**secret, "customer": customer}, {**symptoms, "customer": customer}])
    with session_scope(chain) as session:
        session.add(Member(member_id="M-LHC", name=SECRET_MEMBER, home_store_id="S001"))
    receipt = sale("R-SECRET", now, store_id="S001")
    ingest(chain, [{**receipt, "member_id": "M-LHC", "consultation_id": "C-SECRET"}])
    with session_scope(chain) as session:
        load_templates_and_rules(session=session)
        tokens = {}
        for user_id, (role, scope) in {**OUTSIDERS, **INSIDERS, **CHAIN_WIDE}.items():
            tokens[user_id] = create_user(session=session, user_id=user_id, name=user_id, role=role, **scope)
            set_password(session=session, user_id=user_id, password=PASSWORD)
        device = create_token(session=session, store_id="S002", name="till of S002").token
        alert_id = session.scalar(select(Alert.id).where(Alert.store_id == "S001"))
        pass_rate_alert_id = session.scalar(
            select(Alert.id).where(Alert.store_id == "S001", Alert.rule_id == "pass_rate_watch")
        )
    values = {
        "store_id": "S001", "region_id": "R-ZJ", "alert_id": str(alert_id), "receipt_id": "R-SECRET",
        "promotion_id": promotions_of(chain)[0].promotion_id, "rule_id": "pass_rate_watch",
        "consultation_id": "C-SECRET",
        "letter_id": "1",
        "action": "approve",
    }  # fmt: skip
    app = make_app(chain)
    with LiveServer(app) as server:
        yield {
            "server": server, "app": app, "tokens": tokens, "device": device, "values": values,
            "pass_rate_alert_id": pass_rate_alert_id,
        }  # fmt: skip


def routes(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app, included routers too."""
    found: list[tuple[str, str]] = []
    pending = list(app.routes)
    while pending:
        route = pending.pop(0)
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI ≥ 0.16x keeps an included router as one entry
            pending.extend(included.routes)
            continue
        path = getattr(route, "path", "")
        methods = getattr(route, "methods", None) or set()
        if path.startswith("/static"):
            continue
        found.extend((method, path) for method in sorted(methods - {"HEAD", "OPTIONS"}))
    return found


def fill(path: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"{path}: add a value for {{{name}}} to the access walk"
        return values[name]

    return re.sub(r"\{(\w+)\}", value, path)


def is_device_route(path: str) -> bool:
    return path.startswith(("/api/v1/pos/", "/api/v1/events")) or (
        path.startswith("/api/v1/stores/") and not path.endswith("/status")
    )


def test_every_route_refuses_or_aggregates_for_people_of_another_store_or_region(world: dict[str, Any]) -> None:
    server, values = world["server"], world["values"]
    walked = 0
    for user_id in OUTSIDERS:
        bearer = {"Authorization": f"Bearer {world['tokens'][user_id]}"}
        with closing(sign_in(server.url, user_id, PASSWORD)) as person:
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', person.get("/promotions").text)
            assert csrf
            for method, template in routes(world["app"]):
                if template in ("/login", "/logout"):
                    continue
                action = "acknowledge" if template.startswith("/alerts/") else "approve"
                path = fill(template, {**values, "action": action})
                headers = {"Authorization": f"Bearer {world['device']}"} if is_device_route(template) else bearer
                if method == "GET":
                    response = person.get(path, headers=headers)
                else:
                    body: dict[str, Any] = {"csrf_token": csrf.group(1), "reason": "x", "note": "x"}
                    if template.startswith("/api/"):
                        response = person.request(method, path, headers=headers, json=_api_body(template, values))
                    else:
                        response = person.request(method, path, data=body)
                walked += 1
                text = response.text
                where = f"{user_id} {method} {path}: {response.status_code}"
                assert SECRET_CUSTOMER not in text and SECRET_MEMBER not in text, where
                assert SECRET_SYMPTOM not in text, where
                if method == "GET" and (template in AGGREGATE_PAGES or template in AGGREGATE_API):
                    assert response.status_code in (200, 303, 403), where  # 303: a manager goes to the own store
                    assert "S001" not in response.headers.get("location", ""), where
                    assert 'id="store-S001"' not in text or (user_id == "mgr-s002" and template == "/live"), where
                    assert "R-SECRET" not in text, where
                    continue
                if template == "/api/v1/events":  # the contract answers 200 and rejects each event
                    assert [r["status"] for r in response.json()["results"]] == ["rejected"], where
                    continue
                assert response.status_code in (403, 404, 422), where
                if response.status_code != 403:
                    assert template.startswith("/api/v1/pos/") or template == "/api/v1/events", where
    assert walked > 60


def _api_body(template: str, values: dict[str, str]) -> dict[str, Any]:
    """A valid body for the route, so that only the scope can refuse it."""
    if template == "/api/v1/events":
        return {"events": [sale("R-X", datetime.now(UTC), store_id="S001")]}
    if template.startswith("/api/v1/pos/"):
        return {"store_id": "S001", "terminal_id": "T1", "receipt_id": "R-SECRET", "sku": "6901234567890",
                "skus": ["6901234567890"], "prompt_id": "recommendation_source", "answer": "doctor",
                "step": "consultation", "status": "done"}  # fmt: skip
    if template.endswith("/ack") and "/stores/" in template:
        return {"terminal_id": "T1", "promotions_version": 1}
    return {"reason": "x", "note": "x"}


def test_headquarters_sees_everything_with_customer_names_masked(world: dict[str, Any]) -> None:
    server = world["server"]
    with closing(sign_in(server.url, "hq", PASSWORD)) as hq:
        store = hq.get("/stores/S001").text
        assert "令*冲" in store and SECRET_MEMBER not in store
        trace = hq.get("/stores/S001/receipts/R-SECRET/trace").text
        assert "欧*锋" in trace and SECRET_CUSTOMER not in trace
    api = httpx.get(f"{server.url}/api/v1/alerts", headers={"Authorization": f"Bearer {world['tokens']['hq']}"}).json()[
        "alerts"
    ]
    assert api and all(a["evidence_masked"] for a in api)


# What each role gets on S001's trace and alert pages: "full" (names and symptoms), "masked"
# (names masked, symptoms withheld) or 403.
SEES_CUSTOMER_DATA = {
    **{user_id: "full" for user_id in INSIDERS},
    **{user_id: "masked" for user_id in CHAIN_WIDE},
    **{user_id: 403 for user_id in OUTSIDERS},
}
WITHHELD = "（不向总部显示）"


def test_every_role_gets_the_trace_and_alert_pages_with_the_customer_data_it_may_see(world: dict[str, Any]) -> None:
    server, alert_id = world["server"], world["pass_rate_alert_id"]
    assert sorted(SEES_CUSTOMER_DATA) == sorted([*INSIDERS, *CHAIN_WIDE, *OUTSIDERS])
    for user_id, expected in SEES_CUSTOMER_DATA.items():
        with closing(sign_in(server.url, user_id, PASSWORD, headers={"Accept-Language": "zh-CN"})) as person:
            trace = person.get("/stores/S001/receipts/R-SECRET/trace")
            alert = person.get(f"/alerts/{alert_id}")
        api = httpx.get(
            f"{server.url}/api/v1/alerts/{alert_id}", headers={"Authorization": f"Bearer {world['tokens'][user_id]}"}
        )
        pages = {"trace": trace, "alert": alert, "api": api}
        if expected == 403:
            assert {k: r.status_code for k, r in pages.items()} == {"trace": 403, "alert": 403, "api": 403}, user_id
            for response in pages.values():
                for secret in (SECRET_CUSTOMER, SECRET_SYMPTOM, "王建国", "王*国", "胸闷"):
                    assert secret not in response.text, (user_id, secret)
            continue
        assert {k: r.status_code for k, r in pages.items()} == {"trace": 200, "alert": 200, "api": 200}, user_id
        evidence = api.json()["evidence"][0]
        if expected == "full":
            assert SECRET_CUSTOMER in trace.text and f"{SECRET_SYMPTOM}三周" in trace.text, user_id
            assert "王建国" in alert.text and "胸闷、心悸" in alert.text, user_id
            assert WITHHELD not in trace.text and WITHHELD not in alert.text, user_id
            assert api.json()["evidence_masked"] is False
            assert (evidence["customer_name"], evidence["member_id"], evidence["symptom_keywords"]) == (
                "王建国", "M00000", ["胸闷", "心悸"]
            ), user_id  # fmt: skip
        else:
            assert "欧*锋" in trace.text and SECRET_CUSTOMER not in trace.text, user_id
            assert SECRET_SYMPTOM not in trace.text and WITHHELD in trace.text, user_id
            assert "王*国" in alert.text and "王建国" not in alert.text, user_id
            assert "胸闷" not in alert.text and WITHHELD in alert.text, user_id
            assert api.json()["evidence_masked"] is True
            assert evidence["customer_name"] == "王*国" and evidence["symptoms_withheld"] is True, user_id
            assert "member_id" not in evidence and "symptom_keywords" not in evidence, user_id
            assert "胸闷" not in api.text and "王建国" not in api.text, user_id
