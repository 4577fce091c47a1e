"""The morning meeting report: the page's numbers equal the metric services', exports, scope.

The pass-rate scenario of the rules tests (S001 at 62 % on D3, S002 at 90 %) plus sales and
footfall of D3; real uvicorn and the real login form, on SQLite and TimescaleDB.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from openpyxl import load_workbook
from sqlalchemy import Engine, func, select

from ingest.db import session_scope
from ingest.models import Receipt
from store_rules.metrics import day_metrics
from tests.conftest import LiveServer, create_people, make_app, sign_in
from tests.test_alerts import D3, scenario
from tests.test_metrics import footfall, ingest, local, sale

PASSWORD = "correct horse battery"
PEOPLE = {
    "hq": ("headquarters", {}),
    "sup-sh": ("supervisor", {"region_id": "R-SH"}),
    "mgr-s001": ("manager", {"store_id": "S001"}),
}
CELL = re.compile(r'<tr id="rank-(S\d+)">(.*?)</tr>', re.DOTALL)
VALUE = re.compile(r'data-key="(\w+)" data-value="(\d+)/(\d+)"')


@pytest.fixture
def server(chain: Engine) -> Iterator[LiveServer]:
    scenario(chain)
    ingest(
        chain,
        [sale(f"R{n}", local(D3, 10) + timedelta(minutes=n), store_id="S001", amount="25.50") for n in range(12)]
        + [sale(f"Q{n}", local(D3, 11) + timedelta(minutes=n), store_id="S002") for n in range(5)]
        + [footfall(1, local(D3, 10), 40), footfall(2, local(D3, 11), 20)],
    )
    create_people(chain, PEOPLE, PASSWORD)
    with LiveServer(make_app(chain)) as live:
        yield live


def rows_of(html: str) -> dict[str, dict[str, tuple[int, int]]]:
    return {store: {k: (int(n), int(d)) for k, n, d in VALUE.findall(body)} for store, body in CELL.findall(html)}


def test_the_report_shows_the_metric_services_numbers_and_the_exceptions(server: LiveServer, chain: Engine) -> None:
    with closing(sign_in(server.url, "hq", PASSWORD, headers={"Accept-Language": "zh-CN"})) as hq:
        html = hq.get("/reports/morning", params={"day": D3.isoformat()}).text
    rows = rows_of(html)
    assert list(rows) == ["S001", "S002", "S003"]  # ranked by sales: ¥306.00, ¥50.00, nothing
    with session_scope(chain) as session:
        for store_id, shown in rows.items():
            metrics = day_metrics(session=session, store_id=store_id, day=D3)
            for key in ("insurance_pass_rate", "step_completeness", "symptom_completeness", "traceability",
                        "conversion_rate"):  # fmt: skip
                ratio = getattr(metrics, key)
                assert shown[key] == (ratio.numerator, ratio.denominator), (store_id, key)
        sales = session.scalar(select(func.sum(Receipt.total)).where(Receipt.store_id == "S001"))
    assert Decimal(str(sales)) == Decimal("306.00") and "¥306.00" in html
    assert rows["S001"]["insurance_pass_rate"] == (31, 50)
    assert rows["S001"]["conversion_rate"] == (12, 60)  # 12 sales, 60 visitors
    assert "「温州鹿城店 医保核验通过率 62%」" in html
    assert "杭州西湖店 医保核验通过率" not in html  # 90 %: no exception
    assert "@media print" in httpx.get(f"{server.url}/static/app.css").text  # printable


def test_exports_sorting_and_scope(server: LiveServer) -> None:
    day = {"day": D3.isoformat()}
    with closing(sign_in(server.url, "hq", PASSWORD, headers={"Accept-Language": "zh-CN"})) as hq:
        by_pass_rate = rows_of(hq.get("/reports/morning", params={**day, "sort": "insurance_pass_rate"}).text)
        assert list(by_pass_rate) == ["S002", "S001", "S003"]  # 90 %, 62 %, none last
        xlsx = hq.get("/reports/morning.xlsx", params=day)
        assert xlsx.status_code == 200 and "attachment" in xlsx.headers["content-disposition"]
        book = load_workbook(io.BytesIO(xlsx.content))
        sheet = book["晨会"]
        header = [c.value for c in sheet[1]]
        first = [c.value for c in sheet[2]]
        assert header[:5] == ["排名", "门店编号", "门店", "区域", "销售额"]
        assert first[:5] == [1, "S001", "温州鹿城店", "浙江区", 306.0]
        assert first[header.index("医保核验通过率 (%)")] == 62.0
        # Worst first: no sale could be traced (plain sales without a consultation), then the pass rate.
        assert [c.value for c in book["异常"]["A"]][1:] == [
            "温州鹿城店 销售行为可追溯率 0%", "杭州西湖店 销售行为可追溯率 0%", "温州鹿城店 医保核验通过率 62%",
        ]  # fmt: skip
        text = hq.get("/reports/morning.csv", params=day).content.decode("utf-8")
        assert text.startswith("\ufeff")
        parsed = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
        assert parsed[1][:3] == ["1", "S001", "温州鹿城店"] and len(parsed) == 4
    with closing(sign_in(server.url, "sup-sh", PASSWORD)) as supervisor:
        assert list(rows_of(supervisor.get("/reports/morning", params=day).text)) == ["S003"]
        assert b"S001" not in supervisor.get("/reports/morning.csv", params=day).content
    with closing(sign_in(server.url, "mgr-s001", PASSWORD)) as manager:
        assert manager.get("/reports/morning", params=day).status_code == 403
        assert manager.get("/reports/morning.xlsx", params=day).status_code == 403


def test_the_chain_view_ranks_the_services_numbers_over_30_days(server: LiveServer, chain: Engine) -> None:
    from dashboard.rankings import morning_day
    from store_rules.metrics import store_days

    with closing(sign_in(server.url, "hq", PASSWORD, headers={"Accept-Language": "en"})) as hq:
        html = hq.get("/", params={"days": "30", "sort": "insurance_pass_rate"}).text
    rows = rows_of(html)
    last = morning_day("Asia/Shanghai")
    days = [last - timedelta(days=n) for n in range(30)]
    with session_scope(chain) as session:
        metrics = store_days(session=session, store_ids=["S001", "S002", "S003"], days=days)
    for store_id in ("S001", "S002", "S003"):
        for key in ("insurance_pass_rate", "symptom_completeness", "conversion_rate"):
            ratios = [getattr(metrics[(store_id, d)], key) for d in days]
            expected = (sum(r.numerator for r in ratios), sum(r.denominator for r in ratios))
            assert rows[store_id][key] == expected, (store_id, key)
    assert rows["S001"]["insurance_pass_rate"] == (44, 70)  # 7 + 6 + 31 passes of 10 + 10 + 50 checks
    assert list(rows) == ["S002", "S001", "S003"]  # sorted by pass rate: 90 %, 62.9 %, none
    assert 'id="compare-region-R-ZJ"' in html and "Last 30 days" in html


def test_a_day_revised_by_late_data_is_marked_on_the_report_and_its_export(server: LiveServer, chain: Engine) -> None:
    from datetime import UTC, datetime

    from store_rules import rollups

    after = datetime(2026, 11, 25, 2, tzinfo=UTC)
    with session_scope(chain) as session:
        rollups.refresh(session=session, now=after)
    with closing(sign_in(server.url, "hq", PASSWORD, headers={"Accept-Language": "zh-CN"})) as hq:
        assert "已修订" not in hq.get("/reports/morning", params={"day": D3.isoformat()}).text

        # An offline till of S002 catches up with a sale of D3 after the day was rolled up.
        ingest(chain, [sale("LATE", local(D3, 20), store_id="S002", amount="30.00")])
        with session_scope(chain) as session:
            rollups.refresh(session=session, now=after + timedelta(hours=1))  # 10:00 in Shanghai
        html = hq.get("/reports/morning", params={"day": D3.isoformat()}).text
        revised = {store: "已修订 11-25 11:00" in body for store, body in CELL.findall(html)}
        assert revised == {"S001": False, "S002": True, "S003": False}
        exported = hq.get("/reports/morning.csv", params={"day": D3.isoformat()}).content.decode("utf-8-sig")
    table = list(csv.reader(io.StringIO(exported)))
    assert table[0][-1] == "数据修订于（本地时间）"
    assert {row[1]: row[-1] for row in table[1:]} == {"S001": "", "S002": "2026-11-25 11:00", "S003": ""}
