"""The audit log: logins, approvals, acknowledgements and rule changes, one row each, never updated.

Services call `record` inside their own transaction, so an action and its audit entry commit
(or roll back) together.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.models import AuditEntry


def record(
    *,
    session: Session,
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
    at: datetime | None = None,
) -> None:
    session.add(
        AuditEntry(
            at=at or datetime.now(UTC), actor=actor[:64], action=action, target=target[:200] if target else None,
            detail=detail or {}, ip=ip[:64] if ip else None,
        )
    )  # fmt: skip


def entries(
    *, session: Session, actions: Iterable[str] | None = None, actor: str | None = None, limit: int = 200
) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    if actions is not None:
        query = query.where(AuditEntry.action.in_(list(actions)))
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    return list(session.scalars(query))
