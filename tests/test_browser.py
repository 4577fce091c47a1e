"""Browser tests: Playwright driving Debian's Chromium (no browser download) against the real app.

Each role signs in through the login form and sees what it may see; a manager approves a
promotion, a supervisor acknowledges an alert, headquarters downloads the morning report as
XLSX. A screenshot of each main page is saved under test-output/screenshots/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from openpyxl import load_workbook
from sqlalchemy import Engine, select

from ingest.db import session_scope
from store_rules.alerts.models import Alert
from store_rules.promotions.models import Promotion
from tests.conftest import LiveServer, create_people, make_app, unavailable
from tests.test_alerts import D1, D2, D3, evaluate, scenario, seed_rule
from tests.test_promotions import evaluate as evaluate_stock
from tests.test_promotions import stock_watch_scenario

CHROMIUM = os.environ.get("STOREPULSE_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
PASSWORD = "correct horse battery"
PEOPLE = {
    "staff-s001": ("staff", {"store_id": "S001"}),
    "manager-s001": ("manager", {"store_id": "S001"}),
    "supervisor-zj": ("supervisor", {"region_id": "R-ZJ"}),
    "hq": ("headquarters", {}),
    "admin": ("admin", {}),
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def server(pg_chain: Engine) -> Iterator[LiveServer]:
    stock_watch_scenario(pg_chain)
    evaluate_stock(pg_chain, "stock_watch", now=datetime.now(UTC))
    scenario(pg_chain)
    for day in (D1, D2, D3):
        evaluate(pg_chain, seed_rule(), day, now=datetime.now(UTC))
    create_people(pg_chain, PEOPLE, PASSWORD)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with LiveServer(make_app(pg_chain)) as live:
        yield live


def signed_in(browser: Any, server: LiveServer, user_id: str, lang: str = "zh-CN") -> Any:
    context = browser.new_context(locale=lang, extra_http_headers={"Accept-Language": lang}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{server.url}/login")
    page.fill("#user_id", user_id)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    return page


def test_each_role_signs_in_and_sees_its_scope(browser: Any, server: LiveServer) -> None:
    page = browser.new_page()
    page.goto(f"{server.url}/")
    assert page.url.endswith("/login?next=/")
    page.screenshot(path=str(SCREENSHOTS / "login.png"), full_page=True)
    page.close()

    staff = signed_in(browser, server, "staff-s001")
    assert staff.url.endswith("/stores/S001") and "温州鹿城店" in staff.inner_text("h1")
    assert staff.locator("form.decide button.approve").count() == 0  # staff do not decide
    staff.context.close()

    supervisor = signed_in(browser, server, "supervisor-zj")
    assert supervisor.locator("#store-S001").count() == 1 and supervisor.locator("#store-S003").count() == 0
    assert supervisor.locator("#region-R-SH").count() == 1  # other regions: totals only
    supervisor.goto(f"{server.url}/stores/S003")
    assert "您无权查看门店 S003" in supervisor.content()
    supervisor.context.close()

    hq = signed_in(browser, server, "hq", lang="en")
    for store in ("S001", "S002", "S003"):
        assert hq.locator(f"#store-{store}").count() == 1
    hq.screenshot(path=str(SCREENSHOTS / "chain.png"), full_page=True)
    hq.goto(f"{server.url}/?days=30")
    assert hq.locator("#rank-S001").count() == 1 and hq.locator(".chart svg").count() == 1  # ECharts drew
    hq.screenshot(path=str(SCREENSHOTS / "chain-30-days.png"), full_page=True)
    hq.context.close()

    admin = signed_in(browser, server, "admin", lang="en")
    assert admin.locator("#store-S003").count() == 1
    admin.click("form.inline button")  # sign out
    admin.wait_for_load_state("load")
    assert admin.url.endswith("/login")
    admin.context.close()


def test_a_manager_approves_a_promotion(browser: Any, server: LiveServer, pg_chain: Engine) -> None:
    with session_scope(pg_chain) as session:
        draft_id = session.scalars(select(Promotion.promotion_id)).one()
    page = signed_in(browser, server, "manager-s001")
    row = page.locator(f"#promotion-{draft_id}")
    row.locator("input[name=p_percent]").fill("15")
    row.locator("button.approve").click()
    page.wait_for_load_state("load")
    assert "已批准，已发布到本店所有收银台。" in page.content()
    assert page.locator(f"#active-{draft_id}").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "store.png"), full_page=True)
    page.context.close()
    with session_scope(pg_chain) as session:
        promotion = session.scalars(select(Promotion)).one()
        assert (promotion.status, promotion.params["percent"], promotion.decided_by) == ("active", 15, "manager-s001")


def test_a_supervisor_acknowledges_an_alert(browser: Any, server: LiveServer, pg_chain: Engine) -> None:
    with session_scope(pg_chain) as session:
        alert_id = session.scalars(select(Alert.id).where(Alert.rule_id == "pass_rate_watch")).one()
    page = signed_in(browser, server, "supervisor-zj")
    page.goto(f"{server.url}/regions/R-ZJ")
    row = page.locator(f"#alert-{alert_id}")
    row.locator("input[name=note]").first.fill("已联系店长复核")
    row.locator("button", has_text="确认").click()
    page.wait_for_load_state("load")
    assert page.locator(f"#alert-{alert_id} .tag-acknowledged").count() == 1
    assert page.locator(".chart svg").count() == 1  # the pass-rate trend, drawn from its table
    page.screenshot(path=str(SCREENSHOTS / "region.png"), full_page=True)
    page.goto(f"{server.url}/alerts/{alert_id}")
    assert "已联系店长复核" in page.content()
    page.screenshot(path=str(SCREENSHOTS / "alert.png"), full_page=True)
    page.context.close()
    with session_scope(pg_chain) as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None and (alert.status, alert.acknowledged_by) == ("acknowledged", "supervisor-zj")


def test_the_morning_report_downloads_as_xlsx(browser: Any, server: LiveServer, tmp_path: Path) -> None:
    page = signed_in(browser, server, "hq")
    page.goto(f"{server.url}/reports/morning?day={D3.isoformat()}")
    assert "「温州鹿城店 医保核验通过率 62%」" in page.content()
    page.screenshot(path=str(SCREENSHOTS / "morning.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#export-xlsx")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"storepulse-morning-{D3.isoformat()}.xlsx"
    sheet = load_workbook(saved)["晨会"]
    assert [c.value for c in sheet[2]][:3] == [1, "S001", "温州鹿城店"]
    page.context.close()
