"""People who use StorePulse: roles, scopes and personal API tokens.

Roles: store staff and store managers belong to a store, region supervisors to a region,
headquarters and admins to the chain. A token is shown once at creation; only its SHA-256
is stored (it is 256 bits of randomness, so a slow hash would only add latency).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest.models import Region, Store, User
from ingest.tokens import hash_token

ROLES = ("staff", "manager", "supervisor", "headquarters", "admin")
STORE_ROLES = ("staff", "manager")
USER_TOKEN_PREFIX = "spu_"


class UserError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """The authenticated person of a request, detached from any session."""

    user_id: str
    name: str
    role: str
    store_id: str | None
    region_id: str | None

    @property
    def chain_wide(self) -> bool:
        return self.role in ("headquarters", "admin")

    def sees_store(self, store_id: str, region_id: str) -> bool:
        """Whether this person may see the full detail of a store."""
        if self.chain_wide:
            return True
        if self.role == "supervisor":
            return region_id == self.region_id
        return store_id == self.store_id


def create_user(
    *, session: Session, user_id: str, name: str, role: str, store_id: str | None = None, region_id: str | None = None
) -> str:
    """Create a user and return the API token (shown once)."""
    if role not in ROLES:
        raise UserError(f"role: unknown role {role!r} (one of {', '.join(ROLES)})")
    if role in STORE_ROLES:
        if not store_id or session.get(Store, store_id) is None:
            raise UserError(f"store: a {role} needs a known store (got {store_id!r})")
        region_id = None
    elif role == "supervisor":
        if not region_id or session.get(Region, region_id) is None:
            raise UserError(f"region: a supervisor needs a known region (got {region_id!r})")
        store_id = None
    else:
        store_id = region_id = None
    if session.get(User, user_id) is not None:
        raise UserError(f"user_id: {user_id!r} already exists")
    token = USER_TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        User(
            user_id=user_id, name=name, role=role, store_id=store_id, region_id=region_id,
            token_hash=hash_token(token), created_at=datetime.now(UTC),
        )
    )  # fmt: skip
    session.flush()
    return token


def list_users(*, session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.role, User.user_id)))


def disable_user(*, session: Session, user_id: str) -> bool:
    user = session.get(User, user_id)
    if user is None or user.disabled_at is not None:
        return False
    user.disabled_at = datetime.now(UTC)
    return True


def authenticate_user(*, session: Session, token: str) -> Principal | None:
    if not token.startswith(USER_TOKEN_PREFIX):
        return None
    user = session.scalars(select(User).where(User.token_hash == hash_token(token), User.disabled_at.is_(None))).first()
    if user is None:
        return None
    return Principal(user.user_id, user.name, user.role, user.store_id, user.region_id)
