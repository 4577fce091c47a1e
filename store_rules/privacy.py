"""Customer data as each reader may see it: names masked, member ids dropped, symptoms withheld.

Services return customer data as stored; whoever shows it to someone passes it through here,
with what the reader may see (`dashboard.permissions` decides that for people and tills;
notifications always get names masked). Nothing here reads the database, so the counter, the
alert service and the pages can all use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The consultation step whose data is the customer's symptoms (keywords and free text).
SYMPTOMS_STEP = "symptoms"


def mask_name(name: str | None) -> str | None:
    """王建国 → 王*国, 李娜 → 李*, Alice → A***e: enough for staff to recognise, not to identify."""
    if not name:
        return name
    if len(name) == 1:
        return "*"
    if len(name) == 2:
        return name[0] + "*"
    return name[0] + "*" * (len(name) - 2) + name[-1]


def masked_evidence(evidence: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evidence as it may leave the system: customer names masked (王*国), member ids dropped."""
    return evidence_as_seen(evidence, names=False, symptoms=True)


def evidence_as_seen(evidence: Sequence[dict[str, Any]], *, names: bool, symptoms: bool) -> list[dict[str, Any]]:
    """Alert evidence for a reader: without `names` names are masked and member ids dropped;
    without `symptoms` the symptom keywords are withheld (`symptoms_withheld`: true)."""
    out = []
    for item in evidence:
        copy = dict(item)
        if not names:
            copy.pop("member_id", None)
            if "customer_name" in copy:
                copy["customer_name"] = mask_name(copy["customer_name"])
        if not symptoms and "symptom_keywords" in copy:
            del copy["symptom_keywords"]
            copy["symptoms_withheld"] = True
        out.append(copy)
    return out


def trace_as_seen(trace: dict[str, Any], *, names: bool, symptoms: bool) -> dict[str, Any]:
    """A receipt's trace (`store_rules.counter.trace`) for a reader.

    Without `names` the customer's name is masked; without `symptoms` the data of the symptoms
    step is withheld (`data_withheld`: true), so neither keywords nor free text reach the reader.
    """
    consultation = trace.get("consultation")
    if consultation is None or (names and symptoms):
        return trace
    consultation = dict(consultation)
    customer = consultation.get("customer")
    if customer is not None and not names:
        consultation["customer"] = {**customer, "name": mask_name(customer.get("name"))}
    if not symptoms:
        consultation["steps"] = [
            {**step, "data": None, "data_withheld": True}
            if step.get("step") == SYMPTOMS_STEP and step.get("data") is not None
            else step
            for step in consultation.get("steps", [])
        ]
    return {**trace, "consultation": consultation}
