"""Post-hoc compliance: flow-controlled sales that arrive without a complete consultation.

Runs as an ingest hook inside the transaction that stores the events, so tills that post
over MQTT without the POS API still produce a violation record (store, staff, receipt,
missing steps). Steps that arrive later re-check the open violations of their consultation
and resolve them when the flow is complete; out-of-order steps stay flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ingest.contract import ConsultationStepEvent, Event, ReceiptEvent
from ingest.hooks import register_accepted_hook
from store_rules.counter import step_records
from store_rules.definitions import active_flow, flow_controlled_skus
from store_rules.flow import Consultation
from store_rules.models import ComplianceViolation

HOOK_NAME = "store_rules.compliance"


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
    records = step_records(
        session, [(sale.store_id, sale.consultation_id) for sale, _ in flagged if sale.consultation_id]
    )
    for sale, skus in flagged:
        consultation = (
            Consultation.of(flow, records.get((sale.store_id, sale.consultation_id), []))
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
    keys = {(s.store_id, s.consultation_id) for s in steps}
    open_rows = session.scalars(
        select(ComplianceViolation).where(
            ComplianceViolation.resolved_at.is_(None),
            ComplianceViolation.consultation_id.in_({cid for _, cid in keys}),
        )
    ).all()
    open_rows = [v for v in open_rows if (v.store_id, v.consultation_id) in keys]
    if not open_rows:
        return 0
    flow = active_flow(session=session)
    records = step_records(session, [(v.store_id, v.consultation_id or "") for v in open_rows])
    now = datetime.now(UTC)
    resolved = 0
    for violation in open_rows:
        key = (violation.store_id, violation.consultation_id or "")
        consultation = Consultation.of(flow, records.get(key, []))
        violation.out_of_order = consultation.out_of_order
        if consultation.complete:
            # The original missing steps stay on record: the sale did go through without them.
            violation.resolved_at = now
            resolved += 1
    return resolved


def install() -> None:
    """Make every ingest path run the compliance check (idempotent)."""
    register_accepted_hook(HOOK_NAME, check_accepted_events)
