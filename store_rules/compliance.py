"""Post-hoc compliance: flow-controlled sales that arrive without a complete consultation.

Runs as an ingest hook inside the transaction that stores the events, so tills that post
over MQTT without the POS API still produce a violation record (store, staff, receipt,
missing steps). Steps that arrive later re-check the open violations of their consultation
and resolve them when the flow is complete; out-of-order steps stay flagged.

Tills reuse consultation ids, so a sale and a step belong together only within
CONSULTATION_WINDOW of each other, the same window the till's checkout gate uses. Every
lookup is bounded by it, which also lets TimescaleDB exclude all other chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ingest.contract import ConsultationStepEvent, Event, ReceiptEvent
from store_rules.counter import steps_around
from store_rules.definitions import active_flow, flow_controlled_skus
from store_rules.flow import CONSULTATION_WINDOW, Consultation, consultation_window
from store_rules.models import ComplianceViolation


def check_accepted_events(session: Session, events: Sequence[Event]) -> None:
    sales = [e for e in events if isinstance(e, ReceiptEvent) and e.kind == "sale"]
    steps = [e for e in events if isinstance(e, ConsultationStepEvent)]
    if sales:
        record_violations(session, sales)
    if steps:
        recheck_open_violations(session, steps)


def record_violations(session: Session, sales: Sequence[ReceiptEvent]) -> int:
    flow = active_flow(session=session)
    controlled = flow_controlled_skus(
        session=session, flow=flow, among={line.sku for sale in sales for line in sale.lines}
    )
    flagged = [(sale, [line.sku for line in sale.lines if line.sku in controlled]) for sale in sales]
    flagged = [(sale, skus) for sale, skus in flagged if skus]
    if not flagged:
        return 0
    rows = []
    now = datetime.now(UTC)
    records = steps_around(
        session,
        [(sale.store_id, sale.consultation_id, sale.occurred_at) for sale, _ in flagged if sale.consultation_id],
    )
    for sale, skus in flagged:
        consultation = (
            Consultation.of(flow, records[(sale.store_id, sale.consultation_id, sale.occurred_at)])
            if sale.consultation_id
            else None
        )
        missing = consultation.missing if consultation else flow.required_steps
        out_of_order = consultation.out_of_order if consultation else []
        if not missing and not out_of_order:
            continue
        rows.append({
            "store_id": sale.store_id, "receipt_event_id": sale.event_id, "receipt_id": sale.receipt_id,
            "occurred_at": sale.occurred_at, "staff_id": sale.staff_id, "consultation_id": sale.consultation_id,
            "skus": sorted(set(skus)), "missing_steps": missing, "out_of_order": out_of_order,
            "flow_version": flow.version, "detected_at": now, "resolved_at": None if missing else now,
        })  # fmt: skip
    if rows:
        insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(ComplianceViolation).values(rows).on_conflict_do_nothing())
    return len(rows)


def recheck_open_violations(session: Session, steps: Sequence[ConsultationStepEvent]) -> int:
    times: dict[tuple[str, str], list[datetime]] = {}
    for step in steps:
        times.setdefault((step.store_id, step.consultation_id), []).append(step.occurred_at)
    candidates = session.scalars(
        select(ComplianceViolation).where(
            ComplianceViolation.resolved_at.is_(None),
            ComplianceViolation.consultation_id.in_({cid for _, cid in times}),
            ComplianceViolation.occurred_at >= min(s.occurred_at for s in steps) - CONSULTATION_WINDOW,
            ComplianceViolation.occurred_at <= max(s.occurred_at for s in steps) + CONSULTATION_WINDOW,
        )
    ).all()
    # Only a step within the window of the sale is a step of that sale's consultation.
    open_rows = [
        v for v in candidates
        if any(_within(at, v.occurred_at) for at in times.get((v.store_id, v.consultation_id or ""), []))
    ]  # fmt: skip
    if not open_rows:
        return 0
    flow = active_flow(session=session)
    records = steps_around(session, [(v.store_id, v.consultation_id or "", v.occurred_at) for v in open_rows])
    now = datetime.now(UTC)
    resolved = 0
    for violation in open_rows:
        consultation = Consultation.of(
            flow, records[(violation.store_id, violation.consultation_id or "", violation.occurred_at)]
        )
        violation.out_of_order = consultation.out_of_order
        if consultation.complete:
            # The original missing steps stay on record: the sale did go through without them.
            violation.resolved_at = now
            resolved += 1
    return resolved


def _within(at: datetime, sale_at: datetime) -> bool:
    first, last = consultation_window(sale_at)
    return first <= at <= last
