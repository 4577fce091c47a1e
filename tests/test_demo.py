"""The demo end to end: real uvicorn, real HTTP, a SQLite database with the demo chain and history.

The store page must show events arriving: a receipt posted through `POST /api/v1/events`
with a device token moves the transaction count of the `/stores/S001/live` fragment that
the page refreshes itself from. The last test runs the actual `storepulse demo` command.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from dashboard.app import create_app
from dashboard.i18n import Translator, choose_language, from_accept_language
from ingest.db import session_scope
from ingest.models import ConsultationStep
from ingest.settings import get_settings
from seeds.demo import PreparedDemo, prepare
from store_rules.definitions import active_flow, active_prompts, load_config_dir
from store_rules.models import ComplianceViolation
from tests.conftest import free_port, sign_in

TRANSACTIONS = re.compile(r'data-metric="transactions" data-value="(\d+)"')
SHANGHAI = ZoneInfo("Asia/Shanghai")


@dataclass
class RunningDemo:
    base_url: str
    prepared: PreparedDemo
    client: httpx.Client  # signed in as headquarters

    def login(self, user_id: str, **client_options: Any) -> httpx.Client:
        password = next(p.password for p in self.prepared.logins if p.user_id == user_id)
        return sign_in(self.base_url, user_id, password, **client_options)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    """The app served by uvicorn in a thread, on a SQLite database with the demo chain and 1 day of history."""
    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    prepared = prepare(url, days=1, echo=lambda _line: None)
    assert prepared.history.rejected == 0, prepared.history.errors
    assert prepared.definitions == [("counter_flow", 1, True), ("prompts", 1, True)]
    settings = get_settings().model_copy(update={"database_url": url})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, prepared.engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{port}"
    hq = next(p for p in prepared.logins if p.role == "headquarters")
    client = sign_in(base_url, hq.user_id, hq.password)
    yield RunningDemo(base_url, prepared, client)
    client.close()
    server.should_exit = True
    thread.join(timeout=10)


def transactions(html: str) -> int:
    match = TRANSACTIONS.search(html)
    assert match, html[:500]
    return int(match.group(1))


def test_the_flow_and_prompt_definitions_are_loaded_and_the_history_is_compliant(demo: RunningDemo) -> None:
    with session_scope(demo.prepared.engine) as session:
        assert active_flow(session=session).version == 1
        assert [p.id for p in active_prompts(session=session).prompts] == ["recommendation_source"]
        # Loading the unchanged files again keeps their versions.
        assert load_config_dir(session=session) == [("counter_flow", 1, False), ("prompts", 1, False)]
        # History went through the compliance hook: every flow-controlled sale has its five steps.
        assert session.scalar(select(func.count()).select_from(ComplianceViolation)) == 0
        reasons = set(session.scalars(select(ConsultationStep.skip_reason).where(ConsultationStep.status == "skipped")))
        flow = active_flow(session=session)
        assert reasons and all(flow.skip_reason_problem(reason) is None for reason in reasons), reasons
    lines: list[str] = []
    again = prepare(demo.prepared.url, days=0, fresh=False, echo=lines.append)
    # Preparing again gave the demo's people new passwords and signed them out everywhere.
    assert demo.client.get("/stores/S001").status_code == 303
    demo.prepared.logins[:] = again.logins
    demo.client = demo.login("hq")
    assert again.definitions == [("counter_flow", 1, False), ("prompts", 1, False)]
    assert any(line.startswith("definitions: counter_flow v1 (unchanged), prompts v1 (unchanged)") for line in lines)


def test_store_page_shows_the_store_and_today_s_numbers(demo: RunningDemo) -> None:
    response = demo.client.get("/stores/S001", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    assert response.status_code == 200
    html = response.text
    assert "温州鹿城店" in html and "交易笔数" in html and "转化率" in html and "客单价" in html
    assert 'data-live-src="/stores/S001/live"' in html and "/static/live.js" in html
    assert re.search(r"¥\d{1,3}(,\d{3})*\.\d\d", html)
    business_day = datetime.now(SHANGHAI)
    assert f"{business_day.year}年{business_day.month}月{business_day.day}日" in html
    if business_day.hour >= 9:  # the history covers today so far: at 09:00 a pharmacy has sold something
        assert transactions(html) > 0
        assert "08:00–09:00" in html
    script = demo.client.get("/static/live.js")
    assert script.status_code == 200 and "data-live-src" in script.text


def test_a_posted_receipt_shows_up_in_the_live_fragment(demo: RunningDemo) -> None:
    live = "/stores/S001/live"
    before = transactions(demo.client.get(live).text)
    receipt_id = f"T{uuid.uuid4().hex[:8]}"
    now = datetime.now(SHANGHAI).replace(microsecond=0)
    event: dict[str, Any] = {
        "type": "receipt", "event_id": f"S001-T2-{receipt_id}", "store_id": "S001", "terminal_id": "T2",
        "receipt_id": receipt_id, "occurred_at": now.isoformat(), "kind": "sale", "staff_id": "E0103",
        "member_id": "M10004", "consultation_id": None,
        "lines": [{"line_no": 1, "sku": "6901234567890", "qty": 1, "unit_price": "42.80", "amount": "42.80"},
                  {"line_no": 2, "sku": "6901574461881", "qty": 2, "unit_price": "6.90", "amount": "13.80"}],
        "total": "56.60",
    }  # fmt: skip
    token = demo.prepared.tokens["S001"]
    response = httpx.post(
        f"{demo.base_url}/api/v1/events", json={"events": [event]}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert response.json()["results"][0]["status"] == "accepted", response.json()

    fragment = demo.client.get(live, headers={"Accept-Language": "zh-CN"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text  # a fragment, not a page
    assert transactions(fragment.text) == before + 1
    assert receipt_id in fragment.text and "¥56.60" in fragment.text and "参松养心胶囊" in fragment.text

    # Posting it again is a duplicate and changes nothing; another store's token may not post for S001.
    again = httpx.post(
        f"{demo.base_url}/api/v1/events", json={"events": [event]}, headers={"Authorization": f"Bearer {token}"}
    )
    assert again.json()["results"][0]["status"] == "duplicate"
    other = httpx.post(
        f"{demo.base_url}/api/v1/events",
        json={"events": [{**event, "event_id": event["event_id"] + "x"}]},
        headers={"Authorization": f"Bearer {demo.prepared.tokens['S002']}"},
    )
    assert other.json()["results"][0]["status"] == "rejected"
    assert transactions(demo.client.get(live).text) == before + 1


def test_accept_language_en_gives_english_labels(demo: RunningDemo) -> None:
    html = demo.client.get("/stores/S001", headers={"Accept-Language": "en-GB,en;q=0.8"}).text
    for label in ("Sales", "Transactions", "Visitors", "Conversion", "Average ticket", "By hour", "Latest receipts"):
        assert label in html, label
    assert "Wenzhou Lucheng" in html and "交易笔数" not in html and '<html lang="en">' in html
    fragment = demo.client.get("/stores/S001/live", headers={"Accept-Language": "en"}).text
    assert "Transactions" in fragment
    # No header at all: English; any zh*: Chinese.
    assert "Transactions" in demo.client.get("/stores/S001").text
    assert "交易笔数" in demo.client.get("/stores/S001", headers={"Accept-Language": "zh-TW"}).text


def test_the_language_switch_sets_a_cookie(demo: RunningDemo) -> None:
    with contextlib.closing(demo.login("supervisor-zj", headers={"Accept-Language": "zh-CN"})) as client:
        assert "交易笔数" in client.get("/stores/S001").text
        switched = client.get("/stores/S001", params={"lang": "en"})
        assert "Transactions" in switched.text and switched.cookies.get("lang") == "en"
        assert 'href="/stores/S001?lang=zh-CN"' in switched.text  # the link back
        assert "Transactions" in client.get("/stores/S001/live").text  # the cookie wins over the header
        assert "交易笔数" in client.get("/", params={"lang": "zh-CN"}).text
        assert "交易笔数" in client.get("/stores/S001").text


def test_chain_page_lists_regions_and_stores(demo: RunningDemo) -> None:
    html = demo.client.get("/", headers={"Accept-Language": "zh-CN"}).text
    for name in ("浙江区", "上海区", "江苏区", "温州鹿城店", "南京鼓楼店", "上海徐汇店"):
        assert name in html, name
    assert len(set(re.findall(r'href="/stores/S\d{3}"', html))) == 12
    # Below today's table: the last 7 days' KPIs, every store ranked, the regions compared, the trend.
    assert len(re.findall(r'<tr id="rank-S\d{3}">', html)) == 12 and 'id="compare-region-R-JS"' in html
    assert 'id="trend-table"' in html and "/static/vendor/echarts/echarts.common.min.js" in html
    assert html.index("浙江区") < html.index("上海区") < html.index("江苏区")
    fragment = demo.client.get("/live", headers={"Accept-Language": "en"}).text
    assert "Zhejiang" in fragment and "<html" not in fragment


def test_unknown_store_is_a_404_page_and_names_are_escaped(demo: RunningDemo) -> None:
    response = demo.client.get("/stores/S999", headers={"Accept-Language": "en"})
    assert response.status_code == 404 and "There is no store S999" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert demo.client.get("/stores/S999/live").status_code == 404
    hostile = demo.client.get("/stores/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert hostile.status_code == 404
    assert "<img src=x" not in hostile.text and "&lt;img src=x onerror=alert(1)&gt;" in hostile.text


# --- the real command ----------------------------------------------------------------------------


def _storepulse() -> list[str]:
    script = Path(sys.executable).with_name("storepulse")
    if script.exists():
        return [str(script)]
    found = shutil.which("storepulse")
    return [found] if found else [sys.executable, "-m", "storepulse"]


def test_storepulse_demo_command_serves_a_live_page_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOREPULSE_")}
    process = subprocess.Popen(
        [*_storepulse(), "demo", "--port", str(port), "--days", "2"],
        cwd=tmp_path,  # var/demo.db is created under the test's directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert time.monotonic() < deadline and process.poll() is None, "".join(output)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("StorePulse demo: "):
                url = line.split(": ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/"
        assert (tmp_path / "var" / "demo.db").exists()

        # The demo printed one login per role; the store manager signs in and sees the store.
        printed = dict(re.findall(r"^  (manager-s001|hq)\s+(\S+)\s", "".join(output), re.MULTILINE))
        assert set(printed) == {"manager-s001", "hq"}, "".join(output)
        manager = sign_in(url.rstrip("/"), "manager-s001", printed["manager-s001"])
        assert httpx.get(url + "stores/S001").status_code == 303  # nobody signed in: to the login form
        page = manager.get("/stores/S001", headers={"Accept-Language": "zh-CN"})
        assert page.status_code == 200 and "温州鹿城店" in page.text
        assert manager.get("/stores/S002").status_code == 403
        first = transactions(manager.get("/stores/S001/live").text)
        deadline = time.monotonic() + 20
        while transactions(manager.get("/stores/S001/live").text) == first:
            assert time.monotonic() < deadline, "the live trickle did not change the transaction count in 20 s"
            time.sleep(1)

        # The definitions were loaded, and the POS tills ring live sales up through the POS API.
        assert any(line.startswith("definitions: counter_flow v1, prompts v1") for line in output), "".join(output)
        assert any(line.startswith("POS tills: S001 T1, S005 T1 ") for line in output), "".join(output)
        database = sqlite3.connect(tmp_path / "var" / "demo.db")
        try:
            deadline = time.monotonic() + 45
            while not database.execute(
                "SELECT count(*) FROM receipts WHERE terminal_id = 'T1' AND store_id IN ('S001', 'S005')"
                " AND receipt_id LIKE '%-L%'"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "no live sale from a POS till in 45 s\n" + "".join(output)
                time.sleep(1)
        finally:
            database.close()
        assert not any("WARNING seeds." in line for line in output), "".join(output)  # nothing refused

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, "".join(output)
        assert any("StorePulse demo stopped." in line for line in output), "".join(output)
        assert not any("spd_" in line for line in output)  # device tokens are never printed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- formats and the language choice -------------------------------------------------------------


def test_money_dates_and_language_choice() -> None:
    zh, en = Translator("zh-CN"), Translator("en")
    assert en.money(Decimal("1234.5")) == zh.money(1234.5) == "¥1,234.50"
    assert en.money(Decimal("-12.5")) == "-¥12.50" and en.money(None) == "–"
    assert en.percent(0.2734) == "27.3%" and en.number(12345) == "12,345"
    assert zh.date(date(2026, 11, 22)) == "2026年11月22日 星期日"
    assert en.date(date(2026, 11, 22)) == "Sunday, 22 November 2026"
    assert zh("transactions") == "交易笔数" and en("transactions") == "Transactions"
    assert en("store_not_found", store_id="S9") == "There is no store S9."
    assert from_accept_language("zh-CN,zh;q=0.9,en;q=0.8") == "zh-CN"
    assert from_accept_language("en-US,en;q=0.9,zh-CN;q=0.8") == "en"
    assert from_accept_language("fr-FR,zh-Hant;q=0.5") == "zh-CN"
    assert from_accept_language("de, fr;q=0.5") == from_accept_language(None) == "en"
    assert from_accept_language("en;q=0.2, zh;q=0.9") == "zh-CN"
    assert choose_language("en", "zh-CN", "zh") == "en"
    assert choose_language("klingon", "zh-CN", "en") == "zh-CN"
    assert choose_language(None, None, "zh-SG") == "zh-CN"
