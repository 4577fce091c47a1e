"""The store page's panels: a manager approves a draft in one click, sees the tills and the stock risks.

Real uvicorn, the real login form and forms with CSRF tokens, on SQLite and TimescaleDB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select

from ingest.db import session_scope
from store_rules.promotions import service
from store_rules.promotions.models import Promotion
from tests.conftest import LiveServer, create_people, make_app, sign_in
from tests.test_metrics import ingest
from tests.test_promotions import FLOW, evaluate, promotions_of, stock, stock_watch_scenario

PASSWORD = "correct horse battery"


@pytest.fixture
def server(chain: Engine) -> Iterator[LiveServer]:
    stock_watch_scenario(chain)
    evaluate(chain, "stock_watch", now=datetime.now(UTC))  # a draft still open to a decision
    people = {
        "mgr-s001": ("manager", {"store_id": "S001"}),
        "mgr-s002": ("manager", {"store_id": "S002"}),
        "sup-zj": ("supervisor", {"region_id": "R-ZJ"}),
    }
    create_people(chain, people, PASSWORD)
    with LiveServer(make_app(chain)) as live:
        yield live


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match
    return match.group(1)


def test_the_manager_approves_a_draft_in_one_click(server: LiveServer, chain: Engine) -> None:
    (draft,) = promotions_of(chain)
    action = f"/stores/S001/promotions/{draft.promotion_id}/approve"
    with closing(sign_in(server.url, "mgr-s001", PASSWORD, headers={"Accept-Language": "zh-CN"})) as manager:
        page = manager.get("/stores/S001").text
        assert f'id="promotion-{draft.promotion_id}"' in page and f'action="{action}"' in page
        assert "库存 9，安全库存 10，近 7 天销量 +42%" in page
        assert 'id="risk-' + FLOW + '"' not in page  # restocked to 80 the day after
        ingest(chain, [stock("S001", FLOW, 3, datetime.now(UTC) - timedelta(minutes=5))])
        risks = manager.get("/stores/S001").text
        assert 'id="risk-' + FLOW + '"' in risks and "低于安全库存" in risks  # the stock panel names the SKU
        token = csrf_of(page)
        assert manager.post(action, data={"p_percent": "20"}).status_code == 403  # no CSRF token
        too_big = manager.post(action, data={"csrf_token": token, "p_percent": "45"})
        assert too_big.status_code == 422 and "params.percent: 45 is outside the template&#39;s bounds" in too_big.text
        done = manager.post(action, data={"csrf_token": token, "p_percent": "20", "p_min_qty": "3", "p_gift_qty": "1"})
        assert done.status_code == 303 and done.headers["location"] == "/stores/S001?done=approve#promotions"
        after = manager.get(done.headers["location"]).text
        assert "已批准，已发布到本店所有收银台。" in after and f'id="active-{draft.promotion_id}"' in after
        assert "满3件减20%" in after and "（促销版本 v1）" in after
        assert 'id="till-T1"' in after  # T1 has not acknowledged yet: shown as behind
    with session_scope(chain) as session:
        approved = session.scalars(select(Promotion)).one()
        assert (approved.status, approved.decided_by, approved.params["percent"]) == ("active", "mgr-s001", 20)
        assert service.current_set(session=session, store_id="S001")["version"] == 1


def test_only_the_store_s_manager_decides_and_a_rejection_needs_a_reason(server: LiveServer, chain: Engine) -> None:
    (draft,) = promotions_of(chain)
    with closing(sign_in(server.url, "sup-zj", PASSWORD, headers={"Accept-Language": "en"})) as supervisor:
        page = supervisor.get("/stores/S001").text
        assert f'id="promotion-{draft.promotion_id}"' in page and "/approve" not in page
        assert "The store&#39;s manager or headquarters decides" in page
        refused = supervisor.post(
            f"/stores/S001/promotions/{draft.promotion_id}/approve", data={"csrf_token": csrf_of(page)}
        )
        assert refused.status_code == 403
    with closing(sign_in(server.url, "mgr-s002", PASSWORD)) as other:
        token = csrf_of(other.get("/stores/S002").text)
        for path in (
            f"/stores/S001/promotions/{draft.promotion_id}/approve",
            f"/stores/S002/promotions/{draft.promotion_id}/approve",
        ):
            assert other.post(path, data={"csrf_token": token}).status_code == 403
    reject = f"/stores/S001/promotions/{draft.promotion_id}/reject"
    with closing(sign_in(server.url, "mgr-s001", PASSWORD, headers={"Accept-Language": "en"})) as manager:
        token = csrf_of(manager.get("/stores/S001").text)
        empty = manager.post(reject, data={"csrf_token": token, "reason": "  "})
        assert empty.status_code == 422 and "reason: a rejection needs a reason" in empty.text
        done = manager.post(reject, data={"csrf_token": token, "reason": "补货已在路上"})
        assert done.status_code == 303
        assert "No promotion waits for a decision." in manager.get("/stores/S001").text
    assert [p.status for p in promotions_of(chain)] == ["rejected"]
    assert httpx.post(f"{server.url}{reject}").status_code == 303  # not signed in: to the login form


def test_the_staff_and_prompt_panels_show_the_metric_services_numbers(chain: Engine) -> None:
    from dashboard.deps import wall_clock
    from store_rules.metrics import prompt_answer_distribution, staff_compliance
    from tests.test_metrics import SHANGHAI, answer, flow_events

    # The page's clock is fixed at 00:25, when the day so far holds just the three consultations.
    now = datetime(2026, 11, 20, 0, 25, tzinfo=SHANGHAI)
    start = now - timedelta(minutes=20)
    ingest(
        chain,
        flow_events("C-A", start)
        + flow_events("C-B", start + timedelta(minutes=6), skipped=("symptoms",), insurance="fail")
        + flow_events("C-C", start + timedelta(minutes=12), absent=("guidance",))
        + [
            answer(1, start, "doctor"),
            answer(2, start + timedelta(minutes=1), "poster"),
            answer(3, start + timedelta(minutes=2), "doctor"),
        ],
    )
    with session_scope(chain) as session:
        (expected,) = staff_compliance(session=session, store_id="S001", day=now.date())
        (prompts,) = prompt_answer_distribution(session=session, store_id="S001", day=now.date()).prompts
    assert (expected.consultations, expected.skipped) == (3, 1)
    assert (expected.steps.numerator, expected.steps.denominator) == (13, 15)  # 5 + 4 + 4 done of 3 × 5
    create_people(chain, {"mgr-s001": ("manager", {"store_id": "S001"})}, PASSWORD)
    app = make_app(chain)
    assert isinstance(app, FastAPI)
    app.dependency_overrides[wall_clock] = lambda: now
    with (
        LiveServer(app) as server,
        closing(sign_in(server.url, "mgr-s001", PASSWORD, headers={"Accept-Language": "zh-CN"})) as manager,
    ):
        html = manager.get("/stores/S001").text
    assert "2026年11月20日" in html
    row = re.search(r'<tr id="staff-E0101">(.*?)</tr>', html, re.DOTALL)
    assert row is not None and "李娜" in row.group(1)
    values = re.findall(r'data-value="(\d+)/(\d+)"', row.group(1))
    assert [tuple(map(int, v)) for v in values] == [
        (expected.steps.numerator, expected.steps.denominator),
        (expected.symptoms.numerator, expected.symptoms.denominator),
        (expected.insurance.numerator, expected.insurance.denominator),
    ]
    assert [(a.answer, a.count) for a in prompts.answers] == [("doctor", 2), ("poster", 1)]
    assert 'data-answer="doctor"' in html and "医生推荐" in html and "海报引导" in html
