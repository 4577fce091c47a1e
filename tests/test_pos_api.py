"""The POS API over real HTTP: scan prompts, the five-step flow, checkout gate, store isolation, trace."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from ingest.contract import STEPS
from ingest.db import session_scope
from ingest.models import Sku
from ingest.service import ingest_payloads
from ingest.tokens import create_token
from store_rules.models import ComplianceViolation
from tests import factories as f
from tests.conftest import LiveServer

CONTROLLED = "6901234567890"  # 参松养心胶囊 in the small chain: flow-controlled, prompt-triggering
PLAIN = "6900000000001"
STEP_DATA: dict[str, dict[str, Any]] = {
    "consultation": {},
    "symptoms": {"text": "胸闷两周", "keywords": ["胸闷", "心悸"]},
    "recommendation": {"skus": [CONTROLLED]},
    "insurance_check": {"result": "pass"},
    "guidance": {"text": "饭后服用"},
}


class Till:
    def __init__(self, server: LiveServer, token: str, store_id: str = "S001") -> None:
        self.base, self.store_id = server.url, store_id
        self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def post(self, path: str, **body: Any) -> httpx.Response:
        return self.client.post(
            f"{self.base}/api/v1{path}", json={"store_id": self.store_id, "terminal_id": "T1", **body}
        )

    def step(self, consultation_id: str, step: str, status: str = "done", **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"step": step, "status": status, "staff_id": "E0101"}
        if status == "done":
            body["data"] = STEP_DATA[step]
        else:
            body["skip_reason"] = "customer_refused"
        return self.post(f"/pos/consultations/{consultation_id}/steps", **{**body, **extra})

    def checkout(self, consultation_id: str | None, skus: list[str]) -> httpx.Response:
        return self.post("/pos/checkout", receipt_id="R1", consultation_id=consultation_id, skus=skus)


def token(engine: Engine, store_id: str) -> str:
    with session_scope(engine) as session:
        return create_token(session=session, store_id=store_id, name=f"till-{store_id}").token


@pytest.fixture
def till(chain: Engine, live_server: LiveServer) -> Till:
    with session_scope(chain) as session:
        session.add(Sku(sku=PLAIN, name_zh="医用口罩", name_en="Medical masks", category="devices"))
        session.add(Sku(sku="6944228406654", name_zh="阿莫西林胶囊", name_en="Amoxicillin capsules",
                        category="antibiotic", is_rx=True))  # fmt: skip
    return Till(live_server, token(chain, "S001"))


def test_scan_shows_the_prompt_once_per_receipt_and_the_flow_status(till: Till) -> None:
    scanned = till.post("/pos/scan", receipt_id="R1", sku=CONTROLLED).json()
    (prompt,) = scanned["prompts"]
    assert prompt["prompt_id"] == "recommendation_source"
    assert prompt["question"] == {"zh-CN": "推荐话术来源", "en": "Where did the recommendation come from?"}
    assert [o["value"] for o in prompt["options"]] == ["doctor", "referral", "poster"]
    assert [o["label"]["zh-CN"] for o in prompt["options"]] == ["医生推荐", "老客转介", "海报引导"]
    assert prompt["input_type"] == "choice" and prompt["required"] is True
    assert scanned["flow"]["missing"] == list(STEPS) and scanned["flow"]["consultation_id"] is None
    assert scanned["promotions"] == []

    bad = till.post("/pos/prompt-answers", receipt_id="R1", sku=CONTROLLED, prompt_id="recommendation_source",
                    answer="tv")  # fmt: skip
    assert bad.status_code == 422 and "'tv' is not an option" in bad.json()["detail"]
    ok = till.post("/pos/prompt-answers", receipt_id="R1", sku=CONTROLLED, prompt_id="recommendation_source",
                   answer="doctor", staff_id="E0101")  # fmt: skip
    assert ok.status_code == 201 and ok.json()["status"] == "accepted"
    assert till.post("/pos/scan", receipt_id="R1", sku=CONTROLLED).json()["prompts"] == []
    assert len(till.post("/pos/scan", receipt_id="R2", sku=CONTROLLED).json()["prompts"]) == 1
    # On a return the sale-only prompt is shown but not required.
    assert (
        till.post("/pos/scan", receipt_id="R3", sku=CONTROLLED, kind="return").json()["prompts"][0]["required"] is False
    )


def test_a_return_needs_no_counter_flow(till: Till) -> None:
    refused = till.post("/pos/checkout", receipt_id="R1", skus=[CONTROLLED])
    assert refused.status_code == 409
    assert till.post("/pos/checkout", receipt_id="R1", skus=[CONTROLLED], kind="return").json() == {"allowed": True}


def test_steps_in_the_same_instant_count_in_flow_order(chain: Engine, till: Till) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    same = at.isoformat()
    # A till with a coarse clock sends the steps with one timestamp, in reverse order.
    ingest(chain, [
        f.step(i, step=s, consultation_id="C-same", event_id=f"same-{s}", occurred_at=same, data=STEP_DATA[s] or None)
        for i, s in enumerate(reversed(STEPS))
    ])  # fmt: skip
    ingest(chain, [f.receipt(8, at=at + timedelta(minutes=1), consultation_id="C-same")])
    trace = till.client.get(f"{till.base}/api/v1/stores/S001/receipts/R8/trace", params={"terminal_id": "T1"}).json()
    assert trace["consultation"]["out_of_order"] == [] and trace["consultation"]["missing"] == []
    assert (
        till.client.get(f"{till.base}/api/v1/stores/S001/receipts/R8/trace", params={"terminal_id": "T9"}).status_code
        == 404
    )


def test_a_plain_sku_has_no_prompt_and_no_flow(till: Till) -> None:
    assert till.post("/pos/scan", receipt_id="R1", sku=PLAIN).json() | {"name": None} == {
        "sku": PLAIN, "name": None, "prompts": [], "flow": None, "promotions": [],
    }  # fmt: skip
    assert till.checkout(None, [PLAIN]).json() == {"allowed": True}


def test_steps_are_recorded_in_order_and_a_skipped_predecessor_counts(till: Till) -> None:
    refused = till.step("C-1", "symptoms")
    assert refused.status_code == 409
    assert refused.json()["error"] == "step: consultation must be done or skipped before symptoms"
    assert till.step("C-1", "consultation").status_code == 201
    no_keywords = till.step("C-1", "symptoms", data={"text": "不舒服", "keywords": []})
    assert no_keywords.status_code == 422
    assert no_keywords.json()["error"] == "data.keywords: symptoms needs at least 1 item(s)"
    unlisted = till.step("C-1", "symptoms", status="skipped", skip_reason="too busy")
    assert unlisted.status_code == 422 and "'too busy' is not a listed reason" in unlisted.json()["error"]
    free_text = till.step("C-1", "symptoms", status="skipped", skip_reason="other: 顾客赶时间")
    assert free_text.status_code == 201
    after = till.step("C-1", "recommendation").json()["flow"]
    assert after == {"consultation_id": "C-1", "done": ["consultation", "recommendation"], "skipped": ["symptoms"],
                     "missing": ["insurance_check", "guidance"], "flow_version": 0}  # fmt: skip
    # A correction supersedes: the skipped symptoms step is now done.
    corrected = till.step("C-1", "symptoms").json()["flow"]
    assert corrected["done"] == ["consultation", "symptoms", "recommendation"] and corrected["skipped"] == []


def test_checkout_is_refused_for_every_combination_of_missing_steps(chain: Engine, till: Till) -> None:
    at = datetime.now(UTC) - timedelta(hours=1)
    for size in range(len(STEPS) + 1):
        for recorded in itertools.combinations(STEPS, size):
            cid = "C-" + ("".join(str(STEPS.index(s) + 1) for s in recorded) or "none")
            # Arbitrary combinations can only come from MQTT / history: store them as events directly.
            events = [
                f.step(index, step=step, consultation_id=cid, event_id=f"{cid}-{step}",
                       occurred_at=(at + timedelta(seconds=index)).isoformat(), data=STEP_DATA[step] or None)
                for index, step in enumerate(recorded)
            ]  # fmt: skip
            with session_scope(chain) as session:
                assert {r.status for r in ingest_payloads(events, session=session, source="test")} <= {"accepted"}
            missing = [s for s in STEPS if s not in recorded]
            response = till.checkout(cid, [PLAIN, CONTROLLED])
            if not missing:
                assert response.status_code == 200 and response.json() == {"allowed": True}
                continue
            assert response.status_code == 409, cid
            body = response.json()
            assert body["allowed"] is False
            assert body["missing"] == [{"step": s, "skus": [CONTROLLED]} for s in missing]
            assert "参松养心胶囊" in body["message"]["zh-CN"] and "Shensong Yangxin" in body["message"]["en"]
            # Skipping (with a reason) every missing step lets the sale through.
            for step in missing:
                with session_scope(chain) as session:
                    ingest_payloads(
                        [f.step(99, step=step, status="skipped", consultation_id=cid, event_id=f"{cid}-{step}-skip",
                                occurred_at=(at + timedelta(minutes=5)).isoformat(), data=None)],
                        session=session, source="test",
                    )  # fmt: skip
            assert till.checkout(cid, [CONTROLLED]).json() == {"allowed": True}, cid


def test_checkout_message_names_steps_in_words_a_cashier_understands(till: Till) -> None:
    till.step("C-9", "consultation")
    body = till.checkout("C-9", ["6944228406654"]).json()  # antibiotic: controlled by category
    assert body["message"]["zh-CN"] == (
        "暂不能结账：阿莫西林胶囊 需要先完成或跳过（选择原因）以下步骤：症状记录、药品推荐、医保核验、用药指导。"
    )
    assert body["message"]["en"] == (
        "Checkout on hold: Amoxicillin capsules need these steps done or skipped with a reason first: "
        "Symptoms recorded, Drug recommendation, Insurance verification, Medication guidance."
    )
    assert till.checkout(None, [CONTROLLED]).json()["missing"][0] == {"step": "consultation", "skus": [CONTROLLED]}


def test_a_token_of_another_store_cannot_scan_record_or_read(
    chain: Engine, till: Till, live_server: LiveServer
) -> None:
    till.step("C-1", "consultation")
    ingest(chain, [f.receipt(7, consultation_id="C-1")])
    other = Till(live_server, token(chain, "S002"))
    other.store_id = "S001"  # a till of S002 pretending to be in S001
    calls = [
        other.post("/pos/scan", receipt_id="R1", sku=CONTROLLED),
        other.step("C-1", "symptoms"),
        other.post("/pos/prompt-answers", receipt_id="R1", sku=CONTROLLED, prompt_id="recommendation_source",
                   answer="doctor"),
        other.checkout("C-1", [CONTROLLED]),
        other.client.get(f"{live_server.url}/api/v1/stores/S001/receipts/R7/trace"),
    ]  # fmt: skip
    assert [c.status_code for c in calls] == [403] * 5
    assert all(c.json()["detail"] == "store_id: this device token is for store 'S002'" for c in calls)
    assert till.client.get(f"{live_server.url}/api/v1/stores/S001/receipts/R7/trace").status_code == 200


def ingest(engine: Engine, events: list[dict[str, Any]]) -> None:
    with session_scope(engine) as session:
        ingest_payloads(events, session=session, source="test")


def violations(engine: Engine) -> list[ComplianceViolation]:
    with session_scope(engine) as session:
        return list(session.scalars(select(ComplianceViolation).order_by(ComplianceViolation.receipt_id)))


def test_a_controlled_sale_without_a_complete_consultation_is_stored_and_flagged(chain: Engine, till: Till) -> None:
    at = datetime.now(UTC) - timedelta(hours=2)
    sale = f.receipt(1, at=at, lines=1, consultation_id="C-late") | {
        "lines": [{"line_no": 1, "sku": CONTROLLED, "qty": 1, "unit_price": "42.80", "amount": "42.80"}],
        "total": "42.80",
    }
    plain = f.receipt(2, at=at) | {"consultation_id": None}
    ingest(
        chain, [sale, plain, {**sale, "event_id": "no-consultation", "receipt_id": "R-none", "consultation_id": None}]
    )
    found = violations(chain)
    assert [(v.receipt_id, v.staff_id, v.missing_steps, v.resolved_at) for v in found] == [
        ("R-none", "E0101", list(STEPS), None),
        ("R1", "E0101", list(STEPS), None),
    ]
    # The steps arrive later over MQTT, in the wrong order: the violation resolves, the disorder stays flagged.
    order = ["consultation", "insurance_check", "symptoms", "recommendation", "guidance"]
    ingest(chain, [
        f.step(i, step=s, consultation_id="C-late", event_id=f"late-{s}", data=STEP_DATA[s] or None,
               occurred_at=(at + timedelta(minutes=i + 1)).isoformat())
        for i, s in enumerate(order)
    ])  # fmt: skip
    late = next(v for v in violations(chain) if v.receipt_id == "R1")
    assert late.resolved_at is not None and late.missing_steps == list(STEPS)
    assert late.out_of_order == ["insurance_check"]
    trace = till.client.get(f"{till.base}/api/v1/stores/S001/receipts/R1/trace").json()
    assert trace["violation"]["missing_steps"] == list(STEPS)
    assert trace["consultation"]["out_of_order"] == ["insurance_check"]


def test_a_sale_through_the_counter_flow_is_clean_and_traceable(chain: Engine, till: Till) -> None:
    for step in STEPS:
        assert till.step("C-ok", step, customer={"member_id": "M1", "name": "王建国"}).status_code == 201
    till.step("C-ok", "insurance_check", data={"result": "fail", "reason": "card expired"})
    till.post("/pos/prompt-answers", receipt_id="R5", sku=CONTROLLED, prompt_id="recommendation_source",
              answer="poster", staff_id="E0101")  # fmt: skip
    assert till.checkout("C-ok", [CONTROLLED]).json() == {"allowed": True}
    ingest(chain, [f.receipt(5, at=datetime.now(UTC), consultation_id="C-ok")])
    assert violations(chain) == []
    trace = till.client.get(f"{till.base}/api/v1/stores/S001/receipts/R5/trace").json()
    consultation = trace["consultation"]
    assert consultation["customer"] == {"member_id": "M1", "name": "王*国"}
    assert (
        consultation["first_contact"]["step"] == "consultation" and consultation["first_contact"]["staff_id"] == "E0101"
    )
    assert [s["step"] for s in consultation["steps"]] == [*STEPS, "insurance_check"]
    superseded = [s for s in consultation["steps"] if s["superseded"]]
    assert [(s["step"], s["data"]["result"]) for s in superseded] == [("insurance_check", "pass")]
    assert consultation["missing"] == [] and consultation["out_of_order"] == []
    assert trace["prompt_answers"][0]["answer"] == "poster"
    assert [line["line_no"] for line in trace["receipt"]["lines"]] == [1, 2, 3, 4]
    assert trace["violation"] is None
