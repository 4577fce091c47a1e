"""The region view and the alert page: a supervisor acknowledges an alert with its evidence.

The pass-rate scenario of the rules tests raises an alert for S001 (region R-ZJ). Real uvicorn,
the real login form, forms with CSRF tokens, on SQLite and TimescaleDB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select

from ingest import audit
from ingest.db import session_scope
from store_rules.alerts.models import Alert
from tests.conftest import LiveServer, create_people, make_app, sign_in
from tests.test_alerts import D1, D2, D3, evaluate, scenario, seed_rule

PASSWORD = "correct horse battery"
PEOPLE = {
    "sup-zj": ("supervisor", {"region_id": "R-ZJ"}),
    "sup-sh": ("supervisor", {"region_id": "R-SH"}),
    "mgr-s001": ("manager", {"store_id": "S001"}),
    "hq": ("headquarters", {}),
}


@pytest.fixture
def server(chain: Engine) -> Iterator[LiveServer]:
    scenario(chain)
    rule = seed_rule()
    for day in (D1, D2, D3):
        evaluate(chain, rule, day, now=datetime.now(UTC))
    create_people(chain, PEOPLE, PASSWORD)
    with LiveServer(make_app(chain)) as live:
        yield live


def the_alert(engine: Engine) -> Alert:
    with session_scope(engine) as session:
        alert = session.scalars(select(Alert)).one()
        session.expunge(alert)
        return alert


def test_a_supervisor_acknowledges_an_alert_from_the_region_page(server: LiveServer, chain: Engine) -> None:
    alert = the_alert(chain)
    with closing(sign_in(server.url, "sup-zj", PASSWORD, headers={"Accept-Language": "zh-CN"})) as supervisor:
        page = supervisor.get("/regions/R-ZJ")
        assert page.status_code == 200
        html = page.text
        assert f'id="alert-{alert.id}"' in html and "温州鹿城店 医保核验通过率连续" in html
        assert 'id="compare-S001"' in html and 'id="compare-S003"' not in html  # only the region's stores
        assert 'id="trend-S001"' in html
        token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
        done = supervisor.post(
            f"/alerts/{alert.id}/acknowledge", data={"csrf_token": token, "note": "已电话店长", "back": "/regions/R-ZJ"}
        )
        assert done.status_code == 303 and done.headers["location"] == "/regions/R-ZJ"
        assert "已确认" in supervisor.get("/regions/R-ZJ").text
        detail = supervisor.get(f"/alerts/{alert.id}").text
        assert "王建国" in detail  # the region's supervisor follows up: names in full
        assert "已电话店长" in detail and "acknowledged" in detail
    with session_scope(chain) as session:
        stored = session.get(Alert, alert.id)
        assert stored is not None and (stored.status, stored.acknowledged_by) == ("acknowledged", "sup-zj")
        (entry,) = audit.entries(session=session, actions=["alert_acknowledged"])
        assert (entry.actor, entry.target, entry.detail["note"]) == ("sup-zj", str(alert.id), "已电话店长")


def test_the_region_page_and_the_alert_stay_in_scope(server: LiveServer, chain: Engine) -> None:
    alert = the_alert(chain)
    with closing(sign_in(server.url, "sup-sh", PASSWORD)) as other:
        assert other.get("/regions/R-ZJ").status_code == 403
        assert other.get(f"/alerts/{alert.id}").status_code == 403
        token = re.search(r'name="csrf_token" value="([^"]+)"', other.get("/regions/R-SH").text).group(1)  # type: ignore[union-attr]
        assert other.post(f"/alerts/{alert.id}/resolve", data={"csrf_token": token}).status_code == 403
    with closing(sign_in(server.url, "mgr-s001", PASSWORD)) as manager:
        assert manager.get("/regions/R-ZJ").status_code == 403
        # The manager sees the store's alert, but it is the region's to act on.
        detail = manager.get(f"/alerts/{alert.id}").text
        assert "王建国" in detail and "/acknowledge" not in detail
    with closing(sign_in(server.url, "hq", PASSWORD)) as hq:
        detail = hq.get(f"/alerts/{alert.id}").text
        assert "王*国" in detail and "王建国" not in detail  # headquarters sees names masked
        assert hq.get("/regions/R-SH").status_code == 200
    assert the_alert(chain).status == "open"
