"""Counter services behind the POS API: scan, record a step, answer a prompt, checkout, trace.

Plain functions taking a session, so the API, the simulator and tests share them. Every
step and answer is stored as a contract event through the ingest service: the POS path and
the MQTT path leave the same trace.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.models import ConsultationStep, PromptAnswer, Receipt, ReceiptLine
from ingest.service import EventResult, ingest_payloads
from store_rules.definitions import (
    FlowDefinition,
    PromptDefinition,
    active_flow,
    active_prompts,
    cached_skus,
    flow_controlled_skus,
    skus_by_code,
)
from store_rules.flow import CONSULTATION_WINDOW, Consultation, StepRecord, StepRefused, consultation_window
from store_rules.models import ComplianceViolation
from store_rules.promotions.service import active_for_sku


class CounterError(ValueError):
    """A request the counter refuses; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# (store_id, consultation_id, the time the consultation is seen at: a sale's time or the till's now)
AnchoredConsultation = tuple[str, str, datetime]


def step_records(
    session: Session, keys: Iterable[tuple[str, str]], *, since: datetime, until: datetime
) -> dict[tuple[str, str], list[StepRecord]]:
    """Step records of several consultations between `since` and `until` (inclusive), in one query.

    The bounds are required: consultation ids are reused, and they let TimescaleDB exclude chunks.
    """
    wanted = set(keys)
    if not wanted:
        return {}
    query = (
        select(
            ConsultationStep.store_id, ConsultationStep.consultation_id, ConsultationStep.step,
            ConsultationStep.status, ConsultationStep.occurred_at, ConsultationStep.staff_id,
            ConsultationStep.skip_reason, ConsultationStep.data, ConsultationStep.event_id,
        ).where(
            ConsultationStep.consultation_id.in_({cid for _, cid in wanted}),
            ConsultationStep.occurred_at >= since, ConsultationStep.occurred_at <= until,
        )
    )  # fmt: skip
    grouped: dict[tuple[str, str], list[StepRecord]] = {key: [] for key in wanted}
    for store_id, cid, step, status, at, staff, reason, data, event_id in session.execute(query):
        if (store_id, cid) in grouped:
            grouped[(store_id, cid)].append(StepRecord(step, status, at, staff, reason, data, event_id))
    return grouped


def steps_around(
    session: Session, anchors: Iterable[AnchoredConsultation]
) -> dict[AnchoredConsultation, list[StepRecord]]:
    """The step records of each consultation within CONSULTATION_WINDOW of its anchor time.

    Anchors close in time share one query; a batch spanning months (history, replays) runs one
    query per stretch, so no query reaches beyond the window of some anchor.
    """
    ordered = sorted(set(anchors), key=lambda anchor: anchor[2])
    found: dict[AnchoredConsultation, list[StepRecord]] = {}
    start = 0
    for end in range(1, len(ordered) + 1):
        if end < len(ordered) and ordered[end][2] - ordered[end - 1][2] <= 2 * CONSULTATION_WINDOW:
            continue
        stretch = ordered[start:end]
        records = step_records(
            session, [(store_id, cid) for store_id, cid, _ in stretch],
            since=consultation_window(stretch[0][2])[0], until=consultation_window(stretch[-1][2])[1],
        )  # fmt: skip
        for store_id, cid, at in stretch:
            first, last = consultation_window(at)
            found[(store_id, cid, at)] = [r for r in records[(store_id, cid)] if first <= r.occurred_at <= last]
        start = end
    return found


def load_consultation(
    session: Session, store_id: str, consultation_id: str, flow: FlowDefinition, at: datetime
) -> Consultation:
    """A consultation as seen at `at` (the till's now): its steps within CONSULTATION_WINDOW of it."""
    anchor = (store_id, consultation_id, at)
    return Consultation.of(flow, steps_around(session, [anchor])[anchor])


def flow_status(consultation_id: str | None, consultation: Consultation | None, flow: FlowDefinition) -> dict[str, Any]:
    if consultation is None:
        return {
            "consultation_id": consultation_id,
            "done": [],
            "skipped": [],
            "missing": flow.required_steps,
            "flow_version": flow.version,
        }
    return {"consultation_id": consultation_id, **consultation.status(), "flow_version": flow.version}


def _prompt_json(prompt: PromptDefinition, kind: str) -> dict[str, Any]:
    return {
        "prompt_id": prompt.id,
        "question": prompt.question.as_dict(),
        "input_type": prompt.input_type,
        "options": [{"value": o.value, "label": {"zh-CN": o.zh_cn, "en": o.en}} for o in prompt.options],
        "required": prompt.is_required(kind),
        "frequency": prompt.frequency,
    }


def scan(
    *,
    session: Session,
    store_id: str,
    receipt_id: str,
    sku: str,
    consultation_id: str | None = None,
    kind: str = "sale",
    promotions_cache_s: float = 2.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What the till shows when a SKU is scanned: prompts, the flow status and promotions."""
    now = now or datetime.now(UTC)
    since, until = consultation_window(now)
    master = cached_skus(session, [sku]).get(sku)
    prompts = []
    for prompt in active_prompts(session=session).prompts:
        if not prompt.trigger.matches(master, sku):
            continue
        if prompt.frequency == "once_per_receipt" and session.scalar(
            select(PromptAnswer.event_id)
            .where(
                PromptAnswer.store_id == store_id,
                PromptAnswer.receipt_id == receipt_id,
                PromptAnswer.prompt_id == prompt.id,
                PromptAnswer.occurred_at >= since,
                PromptAnswer.occurred_at <= until,
            )
            .limit(1)
        ):
            continue
        prompts.append(_prompt_json(prompt, kind))
    flow = active_flow(session=session)
    flow_json = None
    if flow.controlled.matches(master, sku):
        consultation = load_consultation(session, store_id, consultation_id, flow, now) if consultation_id else None
        flow_json = flow_status(consultation_id, consultation, flow)
    return {
        "sku": sku,
        "name": {"zh-CN": master.name_zh, "en": master.name_en} if master else None,
        "prompts": prompts,
        "flow": flow_json,
        "promotions": (
            active_for_sku(session=session, store_id=store_id, sku=sku, ttl_s=promotions_cache_s)
            if kind == "sale"
            else []
        ),
    }


def _store_event(session: Session, store_id: str, event: dict[str, Any]) -> EventResult:
    (result,) = ingest_payloads([event], session=session, source="pos-api", allowed_store_id=store_id)
    if result.status == "rejected":
        raise CounterError(result.error or "rejected", 422)
    return result


def record_step(
    *,
    session: Session,
    store_id: str,
    terminal_id: str,
    consultation_id: str,
    step: str,
    status: str,
    staff_id: str | None = None,
    skip_reason: str | None = None,
    data: dict[str, Any] | None = None,
    customer: dict[str, Any] | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Record one step in order; returns the event result and the flow status after it."""
    flow = active_flow(session=session)
    at = occurred_at or now or datetime.now(UTC)
    consultation = load_consultation(session, store_id, consultation_id, flow, at)
    try:
        consultation.check_next(step, status, skip_reason=skip_reason, data=data)
    except StepRefused as exc:
        code = 409 if str(exc).startswith("step:") and "before" in str(exc) else 422
        raise CounterError(
            str(exc), code, {"error": str(exc), "flow": flow_status(consultation_id, consultation, flow)}
        ) from None
    step_event_id = event_id or f"pos-{uuid.uuid4().hex}"
    event: dict[str, Any] = {
        "type": "consultation_step",
        "event_id": step_event_id,
        "store_id": store_id,
        "terminal_id": terminal_id,
        "consultation_id": consultation_id,
        "occurred_at": at.isoformat(),
        "staff_id": staff_id,
        "customer": customer,
        "step": step,
        "status": status,
        "skip_reason": skip_reason,
        "data": data,
    }
    result = _store_event(session, store_id, event)
    consultation.record(StepRecord(step, status, at, staff_id, skip_reason, data, step_event_id))
    return {
        "event_id": step_event_id,
        "status": result.status,
        "flow": flow_status(consultation_id, consultation, flow),
    }


def record_prompt_answer(
    *,
    session: Session,
    store_id: str,
    terminal_id: str,
    receipt_id: str,
    sku: str,
    prompt_id: str,
    answer: str,
    staff_id: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    prompt = next((p for p in active_prompts(session=session).prompts if p.id == prompt_id), None)
    if prompt is None:
        raise CounterError(f"prompt_id: unknown prompt {prompt_id!r}", 422)
    problem = prompt.answer_problem(answer)
    if problem:
        raise CounterError(problem, 422)
    event = {
        "type": "prompt_answer",
        "event_id": event_id or f"pos-{uuid.uuid4().hex}",
        "store_id": store_id,
        "terminal_id": terminal_id,
        "receipt_id": receipt_id,
        "sku": sku,
        "prompt_id": prompt_id,
        "answer": answer,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
        "staff_id": staff_id,
    }
    result = _store_event(session, store_id, event)
    return {"event_id": event["event_id"], "status": result.status}


@dataclass(frozen=True)
class CheckoutDecision:
    allowed: bool
    missing: list[dict[str, Any]]
    message: dict[str, str] | None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"allowed": self.allowed}
        if not self.allowed:
            body.update(missing=self.missing, message=self.message)
        return body


def checkout(
    *, session: Session, store_id: str, consultation_id: str | None, skus: list[str], now: datetime | None = None
) -> CheckoutDecision:
    """Allowed unless a flow-controlled SKU's consultation still has steps neither done nor skipped.

    Only the consultation's steps within CONSULTATION_WINDOW of `now` count: an id reused later
    starts afresh.
    """
    flow = active_flow(session=session)
    controlled_codes = flow_controlled_skus(session=session, flow=flow, among=skus)
    controlled = [s for s in dict.fromkeys(skus) if s in controlled_codes]
    if not controlled:
        return CheckoutDecision(True, [], None)
    at = now or datetime.now(UTC)
    consultation = load_consultation(session, store_id, consultation_id, flow, at) if consultation_id else None
    missing_steps = consultation.missing if consultation else flow.required_steps
    if not missing_steps:
        return CheckoutDecision(True, [], None)
    names = cached_skus(session, controlled)
    missing = [{"step": step, "skus": controlled} for step in missing_steps]
    steps_zh = "、".join(flow.step(s).name.zh_cn for s in missing_steps)  # type: ignore[union-attr]
    steps_en = ", ".join(flow.step(s).name.en for s in missing_steps)  # type: ignore[union-attr]
    items_zh = "、".join(names[s].name_zh if s in names else s for s in controlled)
    items_en = ", ".join(names[s].name_en if s in names else s for s in controlled)
    message = {
        "zh-CN": f"暂不能结账：{items_zh} 需要先完成或跳过（选择原因）以下步骤：{steps_zh}。",
        "en": f"Checkout on hold: {items_en} need these steps done or skipped with a reason first: {steps_en}.",
    }
    return CheckoutDecision(False, missing, message)


def trace(*, session: Session, store_id: str, receipt_id: str, terminal_id: str | None = None) -> dict[str, Any] | None:
    """A sale followed back to the first contact: consultation steps, prompt answers, lines.

    Customer data comes as stored; show it through `store_rules.privacy.trace_as_seen`.
    """
    query = select(Receipt).where(Receipt.store_id == store_id, Receipt.receipt_id == receipt_id)
    if terminal_id is not None:
        query = query.where(Receipt.terminal_id == terminal_id)
    receipt = session.scalars(query.order_by(Receipt.occurred_at)).first()
    if receipt is None:
        return None
    lines = session.scalars(
        select(ReceiptLine)
        .where(ReceiptLine.event_id == receipt.event_id, ReceiptLine.occurred_at == receipt.occurred_at)
        .order_by(ReceiptLine.line_no)
    ).all()
    names = skus_by_code(session, [line.sku for line in lines])
    # Receipt and consultation ids are reused: only what lies within the window of this sale is its own.
    since, until = consultation_window(receipt.occurred_at)
    answers = session.scalars(
        select(PromptAnswer)
        .where(
            PromptAnswer.store_id == store_id, PromptAnswer.receipt_id == receipt_id,
            PromptAnswer.occurred_at >= since, PromptAnswer.occurred_at <= until,
        )
        .order_by(PromptAnswer.occurred_at)
    ).all()  # fmt: skip
    consultation_json = None
    if receipt.consultation_id:
        flow = active_flow(session=session)
        rows = session.scalars(
            select(ConsultationStep)
            .where(
                ConsultationStep.store_id == store_id,
                ConsultationStep.consultation_id == receipt.consultation_id,
                ConsultationStep.occurred_at >= since,
                ConsultationStep.occurred_at <= until,
            )
            .order_by(ConsultationStep.occurred_at)
        ).all()
        consultation = Consultation.of(
            flow,
            [StepRecord(r.step, r.status, r.occurred_at, r.staff_id, r.skip_reason, r.data, r.event_id) for r in rows],
        )
        effective_ids = {r.event_id for r in consultation.effective.values()}
        customer = next((r for r in rows if r.customer_name or r.member_id), None)
        first = consultation.first_contact
        consultation_json = {
            "consultation_id": receipt.consultation_id,
            "first_contact": {"at": first.occurred_at.isoformat(), "staff_id": first.staff_id, "step": first.step}
            if first
            else None,
            "customer": {"member_id": customer.member_id, "name": customer.customer_name} if customer else None,
            "steps": [
                {
                    "step": r.step,
                    "status": r.status,
                    "at": r.occurred_at.isoformat(),
                    "staff_id": r.staff_id,
                    "skip_reason": r.skip_reason,
                    "data": r.data,
                    "event_id": r.event_id,
                    "superseded": r.event_id not in effective_ids,
                }
                for r in rows
            ],
            **consultation.status(),
            "out_of_order": consultation.out_of_order,
        }
    violation = session.scalars(
        select(ComplianceViolation).where(ComplianceViolation.receipt_event_id == receipt.event_id)
    ).first()
    return {
        "receipt": {
            "receipt_id": receipt.receipt_id,
            "event_id": receipt.event_id,
            "store_id": receipt.store_id,
            "terminal_id": receipt.terminal_id,
            "at": receipt.occurred_at.isoformat(),
            "kind": receipt.kind,
            "staff_id": receipt.staff_id,
            "member_id": receipt.member_id,
            "total": str(receipt.total),
            "lines": [
                {
                    "line_no": line.line_no,
                    "sku": line.sku,
                    "name": {"zh-CN": names[line.sku].name_zh, "en": names[line.sku].name_en}
                    if line.sku in names
                    else None,
                    "qty": str(line.qty),
                    "unit_price": str(line.unit_price),
                    "amount": str(line.amount),
                    "promotion_id": line.promotion_id,
                }
                for line in lines
            ],
        },
        "consultation": consultation_json,
        "prompt_answers": [
            {
                "sku": a.sku,
                "prompt_id": a.prompt_id,
                "answer": a.answer,
                "at": a.occurred_at.isoformat(),
                "staff_id": a.staff_id,
            }
            for a in answers
        ],
        "violation": {
            "missing_steps": violation.missing_steps,
            "out_of_order": violation.out_of_order,
            "detected_at": violation.detected_at.isoformat(),
            "resolved_at": violation.resolved_at.isoformat() if violation.resolved_at else None,
        }
        if violation
        else None,
    }
