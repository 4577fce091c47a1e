"""From a rule's draft to every till, against the real Mosquitto, the real API and the real ingest worker.

The app publishes the store's set retained on `{prefix}/S001/promotions`; three tills that are
online apply it and acknowledge on `.../pos/{terminal}/ack`, the ingest worker records the
acks; a fourth till that was offline gets the retained set when it connects and acknowledges
too. Each test uses its own topic prefix on the machine's broker and clears its retained
message at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest.db import session_scope
from ingest.models import PromotionAck, Terminal
from ingest.tokens import create_token
from ingest.users import create_user
from seeds.promotion_till import PromotionTill
from store_rules.promotions.models import Promotion
from tests.conftest import LiveServer, make_app
from tests.test_mqtt_worker import publisher, running_worker, settings_for, wait_for
from tests.test_promotions import COLD, FLOW, evaluate, promotions_of, stock_watch_scenario


@pytest.fixture
def prefix(mosquitto: tuple[str, int]) -> Iterator[str]:
    prefix = f"sptest-{uuid.uuid4().hex[:8]}/v1"
    yield prefix
    with publisher(mosquitto) as client:  # no retained set left behind on the machine's broker
        client.publish(f"{prefix}/S001/promotions", b"", qos=1, retain=True).wait_for_publish(10)


def acked(engine: Engine, version: int) -> set[str]:
    with session_scope(engine) as session:
        return set(
            session.scalars(
                select(PromotionAck.terminal_id).where(
                    PromotionAck.store_id == "S001", PromotionAck.promotions_version == version
                )
            )
        )


def test_approval_reaches_every_till_and_an_offline_till_on_connect(
    pg_chain: Engine, mosquitto: tuple[str, int], prefix: str
) -> None:
    engine = pg_chain
    stock_watch_scenario(engine)
    evaluate(engine, "stock_watch", now=datetime.now(UTC))  # drafted now, so it is still open to a decision
    (draft,) = promotions_of(engine)
    with session_scope(engine) as session:
        session.add(Terminal(store_id="S001", terminal_id="T4", name="till 4 (offline)"))
        people = {
            "mgr_s001": ("李店长", "manager", {"store_id": "S001"}),
            "mgr_s002": ("钱店长", "manager", {"store_id": "S002"}),
            "sup_zj": ("周督导", "supervisor", {"region_id": "R-ZJ"}),
            "hq": ("总部", "headquarters", {}),
        }
        users = {
            key: create_user(session=session, user_id=key, name=name, role=role, **scope)
            for key, (name, role, scope) in people.items()
        }
        devices = {s: create_token(session=session, store_id=s, name="till").token for s in ("S001", "S002")}
    mqtt_url = f"mqtt://{mosquitto[0]}:{mosquitto[1]}"
    tills = [PromotionTill("S001", t, mqtt_url, prefix) for t in ("T2", "T1", "T3")]
    offline = PromotionTill("S001", "T4", mqtt_url, prefix)
    app = make_app(engine, mqtt_url=mqtt_url, mqtt_topic_prefix=prefix)

    def call(method: str, path: str, who: str | None = None, device: str | None = None, **kw: Any) -> httpx.Response:
        token = users[who] if who else devices[device] if device else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, f"{server.url}/api/v1{path}", headers=headers, timeout=15, **kw)

    approve = f"/promotions/{draft.promotion_id}/approve"
    with (
        running_worker(settings_for(engine, mosquitto, prefix), engine),
        LiveServer(app) as server,
    ):
        for till in tills:
            till.connect()
        try:
            assert call("POST", approve).status_code == 401
            refused = call("POST", approve, "mgr_s002", json={})
            assert refused.status_code == 403
            assert "only the manager of store S001 or headquarters" in refused.json()["detail"]
            assert call("POST", approve, "sup_zj", json={}).status_code == 403
            assert call("GET", f"/promotions/{draft.promotion_id}", "mgr_s002").status_code == 403
            pending = call("GET", "/promotions?status=pending", "mgr_s001").json()["promotions"]
            assert [(p["promotion_id"], p["may_decide"]) for p in pending] == [(draft.promotion_id, True)]
            out_of_bounds = call("POST", approve, "mgr_s001", json={"params": {"percent": 50}})
            assert out_of_bounds.status_code == 422
            assert "params.percent: 50 is outside the template's bounds [0, 30]" in out_of_bounds.json()["detail"]

            approved = call("POST", approve, "mgr_s001", json={"params": {"percent": 20}, "note": "一键通过"})
            assert approved.status_code == 200, approved.text
            assert approved.json()["status"] == "active"
            for till in tills:
                assert till.wait_for(1, timeout=10), f"{till.terminal_id} did not get version 1"
                (applied,) = till.promotions
                assert applied["promotion_id"] == draft.promotion_id
                assert applied["params"]["percent"] == 20 and applied["skus"] == [FLOW]
            wait_for(lambda: acked(engine, 1) == {"T1", "T2", "T3"}, timeout=10)

            status = call("GET", "/stores/S001/promotions/status", "hq").json()
            assert status["version"] == 1
            assert {t["terminal_id"]: t["delivered_version"] for t in status["tills"]} == {
                "T1": 1, "T2": 1, "T3": 1, "T4": None,
            }  # fmt: skip
            assert status["promotions"][0]["tills_never_acknowledged"] == ["T4"]
            assert call("GET", "/stores/S001/promotions/status", "mgr_s002").status_code == 403

            offline.connect()  # the retained set arrives on subscribe
            assert offline.wait_for(1, timeout=10)
            wait_for(lambda: acked(engine, 1) == {"T1", "T2", "T3", "T4"}, timeout=10)
            detail = call("GET", f"/promotions/{draft.promotion_id}", "hq").json()
            assert detail["tills_never_acknowledged"] == []
            assert [a["action"] for a in detail["audit"]] == ["drafted", "approved"]

            # Tills without MQTT: the same set over HTTP, only for their own store.
            served = call("GET", "/stores/S001/promotions", device="S001").json()
            assert served["version"] == 1 and served["promotions"][0]["promotion_id"] == draft.promotion_id
            assert call("GET", "/stores/S001/promotions", device="S002").status_code == 403
            # The scan shows the active promotion of the scanned SKU, and only of that SKU.
            scan = {"store_id": "S001", "terminal_id": "T1", "receipt_id": "R-LIVE-1", "sku": FLOW}
            promotions = call("POST", "/pos/scan", device="S001", json=scan).json()["promotions"]
            assert [p["promotion_id"] for p in promotions] == [draft.promotion_id]
            assert promotions[0]["till_text"]["zh-CN"].startswith("提醒顾客：本品满2件立减20%")
            other = call("POST", "/pos/scan", device="S001", json={**scan, "sku": COLD}).json()
            assert other["promotions"] == []
            # No sale rang it up yet: 0 of 0 lines, no rate; another store's manager does not see S001 at all.
            execution = call("GET", "/promotions/execution", "hq").json()["by_store"]
            assert execution == {"S001": {"redeemed_lines": 0, "eligible_lines": 0, "percent": None}}
            assert call("GET", "/promotions/execution", "mgr_s002").json()["by_store"] == {}

            retracted = call("POST", f"/promotions/{draft.promotion_id}/retract", "hq", json={"reason": "厂家召回"})
            assert retracted.status_code == 200
            for till in [*tills, offline]:
                assert till.wait_for(2, timeout=10)
                assert till.promotions == []
            wait_for(lambda: len(acked(engine, 2)) == 4, timeout=10)
        finally:
            for till in [*tills, offline]:
                till.close()
    with session_scope(engine) as session:
        assert session.scalars(select(Promotion.status)).one() == "retracted"
