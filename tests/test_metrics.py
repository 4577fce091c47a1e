"""Scenario tests of the store metrics: hand-built days with exact values, on SQLite and TimescaleDB.

Events go in through `ingest_payloads` like the tills send them; times are written in the
store's local time (Asia/Shanghai, UTC+8) so the local-day boundaries are visible.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine

from ingest.db import session_scope
from ingest.models import Sku
from ingest.service import ingest_payloads
from store_rules.definitions import FLOW_KIND, store_definition
from store_rules.metrics import (
    MoneyRatio,
    Ratio,
    UnknownStore,
    average_ticket,
    conversion_rate,
    day_metrics,
    insurance_pass_rate,
    prompt_answer_distribution,
    step_completeness,
    store_days,
    symptom_completeness,
    traceability,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 18)
NEXT = DAY + timedelta(days=1)
FLOW_SKU = "6901234567890"  # flow_controlled in the small chain
ANTIBIOTIC = "6900000000111"  # controlled by the default flow's category, not by its flag
PLAIN = "6900000000999"  # not controlled
FIVE = ("consultation", "symptoms", "recommendation", "insurance_check", "guidance")
STEP_DATA: dict[str, dict[str, Any]] = {
    "consultation": {"text": "询问病史"},
    "symptoms": {"text": "胸闷心悸", "keywords": ["胸闷", "心悸"]},
    "recommendation": {"skus": [FLOW_SKU]},
    "insurance_check": {"result": "pass"},
    "guidance": {"text": "饭后服用"},
}


def local(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=SHANGHAI)


def step_event(
    consultation_id: str,
    step: str,
    at: datetime,
    *,
    status: str = "done",
    data: dict[str, Any] | None = None,
    staff_id: str | None = "E0101",
    store_id: str = "S001",
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "type": "consultation_step",
        "event_id": event_id or f"{consultation_id}-{step}-{at:%d%H%M%S}",
        "store_id": store_id,
        "terminal_id": "T1",
        "consultation_id": consultation_id,
        "occurred_at": at.isoformat(),
        "staff_id": staff_id,
        "customer": {"member_id": "M88812", "name": "王建国"},
        "step": step,
        "status": status,
        "skip_reason": "customer_refused" if status == "skipped" else None,
        "data": (data if data is not None else STEP_DATA[step]) if status == "done" else None,
    }


def flow_events(
    consultation_id: str,
    start: datetime,
    *,
    skipped: tuple[str, ...] = (),
    absent: tuple[str, ...] = (),
    insurance: str = "pass",
    store_id: str = "S001",
) -> list[dict[str, Any]]:
    """The five steps a minute apart, some skipped or absent; the insurance check with ``insurance``."""
    events = []
    for index, name in enumerate(FIVE):
        if name in absent:
            continue
        data = {"result": insurance} if name == "insurance_check" else None
        status = "skipped" if name in skipped else "done"
        events.append(
            step_event(
                consultation_id, name, start + timedelta(minutes=index), status=status, data=data, store_id=store_id
            )
        )
    return events


def sale(
    receipt_id: str,
    at: datetime,
    *,
    skus: tuple[str, ...] = (PLAIN,),
    consultation_id: str | None = None,
    kind: str = "sale",
    store_id: str = "S001",
    amount: str = "10.00",
) -> dict[str, Any]:
    sign = -1 if kind == "return" else 1
    line_amount = sign * Decimal(amount)
    lines = [
        {"line_no": n, "sku": sku, "qty": sign, "unit_price": amount, "amount": str(line_amount)}
        for n, sku in enumerate(skus, start=1)
    ]
    return {
        "type": "receipt",
        "event_id": f"{store_id}-{receipt_id}",
        "store_id": store_id,
        "terminal_id": "T1",
        "receipt_id": receipt_id,
        "occurred_at": at.isoformat(),
        "kind": kind,
        "staff_id": "E0101",
        "member_id": None,
        "consultation_id": consultation_id,
        "lines": lines,
        "total": str(line_amount * len(lines)),
    }


def answer(n: int, at: datetime, value: str, *, sku: str = FLOW_SKU, store_id: str = "S001") -> dict[str, Any]:
    return {
        "type": "prompt_answer",
        "event_id": f"pa-{store_id}-{n}",
        "store_id": store_id,
        "terminal_id": "T1",
        "receipt_id": f"R{n}",
        "sku": sku,
        "prompt_id": "recommendation_source",
        "answer": value,
        "occurred_at": at.isoformat(),
        "staff_id": "E0101",
    }


def footfall(n: int, at: datetime, count_in: int, *, store_id: str = "S001") -> dict[str, Any]:
    return {
        "type": "footfall",
        "event_id": f"ff-{store_id}-{n}",
        "store_id": store_id,
        "sensor_id": "door-1",
        "occurred_at": at.isoformat(),
        "period_seconds": 900,
        "in": count_in,
        "out": count_in,
    }


def ingest(engine: Engine, events: list[dict[str, Any]]) -> None:
    with session_scope(engine) as session:
        results = ingest_payloads(events, session=session, source="test")
    refused = [r for r in results if r.status != "accepted"]
    assert not refused, refused


def test_issue_example_ten_consultations(chain: Engine) -> None:
    """10 consultations, 7 with symptoms recorded, 9 insurance checks of which 4 fail."""
    events: list[dict[str, Any]] = []
    for n in range(10):
        start = local(DAY, 9 + n, 5)
        skipped: tuple[str, ...] = ()
        absent: tuple[str, ...] = ()
        if n in (7, 8):
            skipped = ("symptoms",)
        if n == 9:
            absent = ("symptoms", "recommendation", "insurance_check", "guidance")  # an abandoned consultation
        events += flow_events(f"C{n}", start, skipped=skipped, absent=absent, insurance="fail" if n < 4 else "pass")
    ingest(chain, events)

    with session_scope(chain) as session:
        symptoms = symptom_completeness(session=session, store_id="S001", day=DAY)
        passes = insurance_pass_rate(session=session, store_id="S001", day=DAY)
        assert (symptoms.numerator, symptoms.denominator, symptoms.ratio) == (7, 10, 0.7)
        assert str(symptoms) == "7 / 10 = 70.0 %"
        assert passes == Ratio(5, 9)
        assert passes.ratio == 5 / 9
        assert str(passes) == "5 / 9 = 55.6 %"
        everything = day_metrics(session=session, store_id="S001", day=DAY)
        assert everything.symptom_completeness == symptoms
        assert everything.insurance_pass_rate == passes
        # Another store and another day see nothing of it.
        assert symptom_completeness(session=session, store_id="S002", day=DAY) == Ratio(0, 0)
        assert insurance_pass_rate(session=session, store_id="S001", day=NEXT).ratio is None


def test_insurance_correction_supersedes_the_first_result(chain: Engine) -> None:
    ingest(
        chain, flow_events("C1", local(DAY, 10), insurance="pass") + flow_events("C2", local(DAY, 11), insurance="fail")
    )
    with session_scope(chain) as session:
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY) == Ratio(1, 2)

    # The pharmacist re-checks C2's card and it passes: the later event supersedes the first.
    ingest(chain, [step_event("C2", "insurance_check", local(DAY, 11, 30), data={"result": "pass"})])
    with session_scope(chain) as session:
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY) == Ratio(2, 2)

    # A correction the next morning changes the result of DAY's check; it stays a check of DAY.
    ingest(chain, [step_event("C1", "insurance_check", local(NEXT, 9), data={"result": "fail", "reason": "expired"})])
    with session_scope(chain) as session:
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY) == Ratio(1, 2)
        assert insurance_pass_rate(session=session, store_id="S001", day=NEXT) == Ratio(0, 0)

    # Corrected to skipped: no result any more, so the check leaves the rate.
    skip = step_event("C2", "insurance_check", local(DAY, 12), status="skipped")
    ingest(chain, [skip])
    with session_scope(chain) as session:
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY) == Ratio(0, 1)


def test_consultation_spanning_midnight_counts_on_the_day_of_its_first_step(chain: Engine) -> None:
    events = [
        step_event("C-late", "consultation", local(DAY, 23, 50)),
        step_event("C-late", "symptoms", local(NEXT, 0, 10)),
        step_event("C-late", "recommendation", local(NEXT, 0, 12)),
        step_event("C-late", "insurance_check", local(NEXT, 0, 15), data={"result": "fail"}),
        step_event("C-late", "guidance", local(NEXT, 0, 20)),
        # An ordinary consultation of NEXT without symptoms.
        *flow_events("C-next", local(NEXT, 10), skipped=("symptoms",)),
        sale("R1", local(NEXT, 0, 25), skus=(FLOW_SKU,), consultation_id="C-late"),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        assert symptom_completeness(session=session, store_id="S001", day=DAY) == Ratio(1, 1)
        assert symptom_completeness(session=session, store_id="S001", day=NEXT) == Ratio(0, 1)
        # The check itself happened after midnight: it is a check of NEXT.
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY) == Ratio(0, 0)
        assert insurance_pass_rate(session=session, store_id="S001", day=NEXT) == Ratio(1, 2)
        # The sale after midnight sees the whole consultation, begun the day before.
        assert step_completeness(session=session, store_id="S001", day=NEXT) == Ratio(5, 5)
        assert traceability(session=session, store_id="S001", day=NEXT) == Ratio(1, 1)


def test_local_business_day_is_not_the_utc_day(chain: Engine) -> None:
    """23:30 in Shanghai is 15:30 UTC of the same date; 00:30 the next day is still that UTC date."""
    evening, after_midnight, early = local(DAY, 23, 30), local(NEXT, 0, 30), local(DAY, 7, 30)
    assert evening.astimezone(ZoneInfo("UTC")).hour == 15
    assert after_midnight.astimezone(ZoneInfo("UTC")).date() == DAY
    assert early.astimezone(ZoneInfo("UTC")).date() == DAY - timedelta(days=1)
    events = [
        footfall(1, early, 4),
        footfall(2, evening, 6),
        footfall(3, after_midnight, 50),
        sale("R1", early, amount="20.00"),
        sale("R2", evening, amount="30.00"),
        sale("R3", after_midnight, amount="99.00"),
        *flow_events("C-evening", evening, insurance="pass"),
        *flow_events("C-night", after_midnight, insurance="fail", skipped=("symptoms",)),
        answer(1, evening, "doctor"),
        answer(2, after_midnight, "poster"),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        today = day_metrics(session=session, store_id="S001", day=DAY)
        assert today.conversion_rate == Ratio(2, 10)
        assert today.average_ticket == MoneyRatio(Decimal("50.00"), 2)
        assert today.symptom_completeness == Ratio(1, 1)
        assert today.insurance_pass_rate == Ratio(1, 1)
        distribution = today.prompt_answers.of(FLOW_SKU, "recommendation_source")
        assert distribution is not None
        assert distribution.share("doctor") == Ratio(1, 1)
        assert distribution.share("poster") == Ratio(0, 1)

        tomorrow = day_metrics(session=session, store_id="S001", day=NEXT)
        assert tomorrow.conversion_rate == Ratio(1, 50)
        assert tomorrow.average_ticket.ratio == Decimal("99.00")
        assert tomorrow.symptom_completeness == Ratio(0, 1)
        assert tomorrow.insurance_pass_rate == Ratio(0, 1)


def test_step_completeness_counts_skipped_steps_as_not_done(chain: Engine) -> None:
    with session_scope(chain) as session:
        session.add(Sku(sku=ANTIBIOTIC, name_zh="阿莫西林胶囊", name_en="Amoxicillin", category="antibiotic"))
    events = [
        *flow_events("C1", local(DAY, 10), skipped=("insurance_check",)),
        sale("R1", local(DAY, 10, 10), skus=(PLAIN, FLOW_SKU), consultation_id="C1"),
        # Not flow-controlled orders: a plain sale (even with a consultation) and a return.
        *flow_events("C2", local(DAY, 11)),
        sale("R2", local(DAY, 11, 10), skus=(PLAIN,), consultation_id="C2"),
        sale("R3", local(DAY, 12), skus=(FLOW_SKU,), kind="return"),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        completeness = step_completeness(session=session, store_id="S001", day=DAY)
        assert completeness == Ratio(4, 5)
        assert str(completeness) == "4 / 5 = 80.0 %"

    # An antibiotic (controlled by category) sold without a consultation: 5 more required, 0 done.
    # A correction turns C1's guidance into a skip: 3 done.
    ingest(
        chain,
        [
            sale("R4", local(DAY, 15), skus=(ANTIBIOTIC,)),
            step_event("C1", "guidance", local(DAY, 10, 8), status="skipped"),
        ],
    )
    with session_scope(chain) as session:
        assert step_completeness(session=session, store_id="S001", day=DAY) == Ratio(3, 10)
        assert step_completeness(session=session, store_id="S001", day=NEXT) == Ratio(0, 0)


def test_step_completeness_follows_the_flow_in_force(chain: Engine) -> None:
    """A chain that requires three steps only: each order requires 3, not 5."""
    text = """
name: short flow
controlled: {flags: [flow_controlled]}
steps:
  - id: consultation
    name: {zh-CN: 客户问诊, en: Consultation}
  - id: insurance_check
    name: {zh-CN: 医保核验, en: Insurance verification}
  - id: guidance
    name: {zh-CN: 用药指导, en: Medication guidance}
skip_reasons:
  - id: customer_refused
    label: {zh-CN: 顾客拒绝, en: Customer refused}
"""
    with session_scope(chain) as session:
        store_definition(session=session, kind=FLOW_KIND, text=text, source="test")
    ingest(
        chain,
        [
            *flow_events("C1", local(DAY, 10), skipped=("guidance",)),
            sale("R1", local(DAY, 10, 10), skus=(FLOW_SKU,), consultation_id="C1"),
        ],
    )
    with session_scope(chain) as session:
        assert step_completeness(session=session, store_id="S001", day=DAY) == Ratio(2, 3)


def test_traceability(chain: Engine) -> None:
    at = local(DAY, 14)
    events = [
        # Traceable: first contact before the sale, with staff; symptoms with keywords.
        *flow_events("C-full", at - timedelta(minutes=10)),
        sale("R-full", at, consultation_id="C-full"),
        # Traceable: only the recommendation carries the key content.
        step_event("C-rec", "consultation", at - timedelta(minutes=5)),
        step_event("C-rec", "symptoms", at - timedelta(minutes=4), status="skipped"),
        step_event("C-rec", "recommendation", at - timedelta(minutes=3)),
        sale("R-rec", at + timedelta(seconds=1), consultation_id="C-rec"),
        # Not: no consultation at all.
        sale("R-none", at + timedelta(seconds=2)),
        # Not: the first contact names no staff member.
        step_event("C-anon", "consultation", at - timedelta(minutes=5), staff_id=None),
        step_event("C-anon", "symptoms", at - timedelta(minutes=4)),
        sale("R-anon", at + timedelta(seconds=3), consultation_id="C-anon"),
        # Not: the consultation was only recorded after the sale.
        *flow_events("C-after", at + timedelta(minutes=30)),
        sale("R-after", at + timedelta(seconds=4), consultation_id="C-after"),
        # Not: no key content (symptoms without keywords, recommendation skipped).
        step_event("C-empty", "consultation", at - timedelta(minutes=5)),
        step_event("C-empty", "symptoms", at - timedelta(minutes=4), data={"text": "?", "keywords": []}),
        step_event("C-empty", "recommendation", at - timedelta(minutes=3), status="skipped"),
        sale("R-empty", at + timedelta(seconds=5), consultation_id="C-empty"),
        # Not counted at all: a return, and a sale of another store naming C-full.
        sale("R-ret", at + timedelta(seconds=6), kind="return", consultation_id="C-full"),
        sale("R-other", at, consultation_id="C-full", store_id="S002"),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        assert traceability(session=session, store_id="S001", day=DAY) == Ratio(2, 6)
        assert traceability(session=session, store_id="S002", day=DAY) == Ratio(0, 1)

    # The symptoms of C-empty are corrected with a keyword: now it is traceable.
    correction = step_event("C-empty", "symptoms", at - timedelta(minutes=2), data={"keywords": ["咳嗽"]})
    ingest(chain, [correction])
    with session_scope(chain) as session:
        assert traceability(session=session, store_id="S001", day=DAY) == Ratio(3, 6)


def test_prompt_answer_distribution(chain: Engine) -> None:
    at = local(DAY, 16)
    events = [
        answer(1, at, "doctor"),
        answer(2, at + timedelta(minutes=1), "poster"),
        answer(3, at + timedelta(minutes=2), "doctor"),
        answer(4, at + timedelta(minutes=3), "doctor"),
        answer(5, at, "referral", sku=ANTIBIOTIC),
        answer(6, local(NEXT, 9), "poster"),  # another day
        answer(7, at, "poster", store_id="S002"),  # another store
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        distribution = prompt_answer_distribution(session=session, store_id="S001", day=DAY)
    assert [(p.sku, p.prompt_id, p.total) for p in distribution.prompts] == [
        (ANTIBIOTIC, "recommendation_source", 1),
        (FLOW_SKU, "recommendation_source", 4),
    ]
    shensong = distribution.of(FLOW_SKU, "recommendation_source")
    assert shensong is not None
    assert [(a.answer, a.count, a.share.ratio) for a in shensong.answers] == [("doctor", 3, 0.75), ("poster", 1, 0.25)]
    assert str(shensong.share("doctor")) == "3 / 4 = 75.0 %"
    assert str(shensong.share("poster")) == "1 / 4 = 25.0 %"
    assert shensong.share("referral") == Ratio(0, 4)
    assert distribution.of(FLOW_SKU, "unknown") is None


def test_conversion_rate_and_average_ticket(chain: Engine) -> None:
    events = [
        footfall(1, local(DAY, 9), 37),
        footfall(2, local(DAY, 9, 15), 43),
        sale("R1", local(DAY, 9, 5), amount="12.50"),
        sale("R2", local(DAY, 9, 20), skus=(PLAIN, FLOW_SKU), amount="20.00"),
        sale("R3", local(DAY, 10), amount="7.30"),
        sale("R4", local(DAY, 11), amount="0.10"),
        sale("R5", local(DAY, 12), amount="10.00", kind="return"),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:
        conversion = conversion_rate(session=session, store_id="S001", day=DAY)
        ticket = average_ticket(session=session, store_id="S001", day=DAY)
        empty_ticket = average_ticket(session=session, store_id="S001", day=NEXT)
    assert conversion == Ratio(4, 80)
    assert str(conversion) == "4 / 80 = 5.0 %"
    # Net sales 12.50 + 40.00 + 7.30 + 0.10 - 10.00 = 49.90 over 4 transactions.
    assert ticket.numerator == Decimal("49.90")
    assert ticket.denominator == 4
    assert ticket.ratio == Decimal("12.48")
    assert str(ticket) == "49.90 / 4 = 12.48"
    assert empty_ticket == MoneyRatio(Decimal("0.00"), 0)
    assert empty_ticket.ratio is None


def test_store_days_equals_day_by_day(chain: Engine) -> None:
    days = [DAY - timedelta(days=1), DAY, NEXT, NEXT + timedelta(days=5)]
    events: list[dict[str, Any]] = []
    answers = 0
    for store_number, store_id in enumerate(("S001", "S002", "S003")):
        for day_number, day in enumerate(days[:3]):
            prefix = f"{store_id}-{day_number}"
            for n in range(store_number + day_number + 1):
                start = local(day, 9 + n, 0)
                cid = f"{prefix}-C{n}"
                events += flow_events(
                    cid,
                    start,
                    store_id=store_id,
                    insurance="fail" if n % 2 else "pass",
                    skipped=("symptoms",) if n % 3 == 2 else (),
                )
                events.append(
                    sale(
                        f"{prefix}-R{n}",
                        start + timedelta(minutes=6),
                        skus=(FLOW_SKU,),
                        consultation_id=cid,
                        store_id=store_id,
                    )
                )
                answers += 1
                events.append(answer(answers, start, "doctor" if n % 2 else "poster", store_id=store_id))
            events.append(footfall(day_number, local(day, 8), 10 * (n + 1), store_id=store_id))
        # A consultation running over the midnight between the first two days.
        events.append(step_event(f"{store_id}-span", "consultation", local(days[0], 23, 55), store_id=store_id))
        events.append(step_event(f"{store_id}-span", "symptoms", local(DAY, 0, 5), store_id=store_id))
    ingest(chain, events)

    with session_scope(chain) as session:
        many = store_days(session=session, store_ids=["S003", "S001", "S002"], days=reversed(days))
        assert list(many) == [(store, day) for store in ("S003", "S001", "S002") for day in days]
        for (store_id, day), metrics in many.items():
            assert metrics == day_metrics(session=session, store_id=store_id, day=day)
            assert metrics.timezone == "Asia/Shanghai"
        # Spot checks: S002 on DAY had 3 consultations (2 pass, 1 fail; the third skipped its symptoms)
        # plus the one that began at 23:55 the day before.
        s2 = many[("S002", DAY)]
        assert s2.symptom_completeness == Ratio(2, 3)
        assert s2.insurance_pass_rate == Ratio(2, 3)
        assert s2.step_completeness == Ratio(14, 15)
        assert s2.traceability == Ratio(3, 3)
        assert s2.conversion_rate == Ratio(3, 30)
        assert many[("S002", days[0])].symptom_completeness == Ratio(3, 3)
        quiet = many[("S001", days[3])]
        assert quiet.step_completeness == quiet.symptom_completeness == quiet.conversion_rate == Ratio(0, 0)
        assert quiet.prompt_answers.prompts == ()


def test_unknown_store(chain: Engine) -> None:
    with session_scope(chain) as session, pytest.raises(UnknownStore, match="S999"):
        step_completeness(session=session, store_id="S999", day=DAY)
    with session_scope(chain) as session, pytest.raises(UnknownStore, match="S999"):
        store_days(session=session, store_ids=["S001", "S999"], days=[DAY])
