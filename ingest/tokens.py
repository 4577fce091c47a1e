"""Device tokens: a till or counter authenticates with a bearer token bound to one store.

Only a SHA-256 of the token is stored: tokens are 256-bit random strings, so a slow password
hash would add latency to every request without adding safety.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ingest.models import DeviceToken, Store

TOKEN_PREFIX = "spd_"


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class IssuedToken:
    id: int
    store_id: str
    name: str
    token: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, session: Session, store_id: str, name: str | None = None) -> IssuedToken:
    if session.get(Store, store_id) is None:
        raise TokenError(f"store: unknown store {store_id!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = DeviceToken(
        store_id=store_id,
        name=name or f"{store_id}-device",
        token_hash=hash_token(token),
        token_prefix=token[:10],
        created_at=datetime.now(UTC),
    )
    session.add(row)
    session.flush()
    return IssuedToken(id=row.id, store_id=store_id, name=row.name, token=token)


def list_tokens(*, session: Session, store_id: str | None = None) -> list[DeviceToken]:
    query = select(DeviceToken).order_by(DeviceToken.store_id, DeviceToken.id)
    if store_id:
        query = query.where(DeviceToken.store_id == store_id)
    return list(session.scalars(query))


def revoke_token(*, session: Session, token_id: int) -> bool:
    result = session.execute(
        update(DeviceToken)
        .where(DeviceToken.id == token_id, DeviceToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def authenticate(*, session: Session, token: str) -> DeviceToken | None:
    """The active token row for a presented bearer token, or None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = session.scalars(
        select(DeviceToken).where(DeviceToken.token_hash == hash_token(token), DeviceToken.revoked_at.is_(None))
    ).first()
    now = datetime.now(UTC)
    # Refreshed at most once a minute: a till calls the API several times a second.
    if row is not None and (row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1)):
        row.last_used_at = now
    return row
