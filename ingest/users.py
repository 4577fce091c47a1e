"""People who use StorePulse: roles, scopes, personal API tokens, passwords and page sessions.

Roles: store staff and store managers belong to a store, region supervisors to a region,
headquarters and admins to the chain. A token is shown once at creation; only its SHA-256
is stored (it is 256 bits of randomness, so a slow hash would only add latency). Passwords
are hashed with argon2id; after `MAX_FAILURES` wrong passwords in a row the account is locked
for `LOCKOUT`, whatever is tried meanwhile. Every login, failure and lockout is audited.

Parallel guesses must not each count from the same old number: a failure is one UPDATE that
adds 1 and, at the threshold, sets the lock, and it only applies while the account is not
locked. So of any number of simultaneous wrong passwords exactly `MAX_FAILURES` are counted, the
last of them locks, and the others are refused as locked. What a person may see is decided in
`dashboard.permissions`, not here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ColumnElement, case, func, literal, or_, select, update
from sqlalchemy.orm import Session

from ingest import audit
from ingest.models import Region, Store, User, WebSession
from ingest.tokens import hash_token
from ingest.types import UtcDateTime

ROLES = ("staff", "manager", "supervisor", "headquarters", "admin")
MIN_PASSWORD_LENGTH = 10
MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)
SESSION_TTL = timedelta(hours=12)
_hasher = PasswordHasher()
# Verifying against this when the user does not exist costs the same as a real check, so the
# answer time does not tell which user ids exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
STORE_ROLES = ("staff", "manager")
USER_TOKEN_PREFIX = "spu_"


class UserError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """The authenticated person of a request, detached from any session.

    Who may see and do what is `dashboard.permissions`; this is only who the person is.
    """

    user_id: str
    name: str
    role: str
    store_id: str | None
    region_id: str | None


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
    session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=user.disabled_at)
    )
    audit.record(session=session, actor="admin", action="user_disabled", target=user_id)
    return True


def authenticate_user(*, session: Session, token: str) -> Principal | None:
    if not token.startswith(USER_TOKEN_PREFIX):
        return None
    user = session.scalars(select(User).where(User.token_hash == hash_token(token), User.disabled_at.is_(None))).first()
    return None if user is None else _principal(user)


# --- passwords and page sessions ------------------------------------------------------------


def set_password(*, session: Session, user_id: str, password: str, actor: str | None = None) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    user = session.get(User, user_id)
    if user is None:
        raise UserError(f"user_id: no user {user_id!r}")
    user.password_hash = _hasher.hash(password)
    user.failed_logins, user.locked_until = 0, None
    # A new password signs every browser out.
    session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    audit.record(session=session, actor=actor or user_id, action="password_set", target=user_id)


@dataclass(frozen=True)
class LoginResult:
    principal: Principal | None
    session_token: str | None = None  # the cookie value, shown once
    csrf_token: str | None = None
    refused: str | None = None  # "invalid" or "locked"
    locked_until: datetime | None = None


def login(
    *, session: Session, user_id: str, password: str, ip: str | None = None, now: datetime | None = None
) -> LoginResult:
    """Check a password; on success open a new page session (never reuse one: no fixation)."""
    now = now or datetime.now(UTC)
    user = session.get(User, user_id) if user_id else None
    if user is None or user.disabled_at is not None or user.password_hash is None:
        _verify(_DUMMY_HASH, password)
        audit.record(
            session=session, actor=user_id[:64] or "?", action="login_failed", detail={"why": "unknown"}, ip=ip
        )
        return LoginResult(None, refused="invalid")
    if user.locked_until is not None and user.locked_until > now:
        _verify(_DUMMY_HASH, password)  # as slow as a real check: the timing must not tell "locked"
        return _refused_locked(session, user.user_id, user.locked_until, ip)
    if not _verify(user.password_hash, password):
        return _count_failure(session, user.user_id, now, ip)
    opened = session.execute(
        update(User)
        .where(User.user_id == user.user_id, _not_locked(now))
        .values(failed_logins=0, locked_until=None, last_login_at=now)
        .returning(User.user_id)
        .execution_options(synchronize_session=False)
    ).first()
    if opened is None:  # locked by parallel wrong guesses while this password was checked
        session.refresh(user)
        return _refused_locked(session, user.user_id, user.locked_until, ip)
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(
        WebSession(
            id_hash=hash_token(token),
            user_id=user.user_id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + SESSION_TTL,
        )
    )
    audit.record(session=session, actor=user.user_id, action="login", ip=ip)
    return LoginResult(_principal(user), session_token=token, csrf_token=csrf)


def _not_locked(now: datetime) -> ColumnElement[bool]:
    return or_(User.locked_until.is_(None), User.locked_until <= now)


def _count_failure(session: Session, user_id: str, now: datetime, ip: str | None) -> LoginResult:
    """One wrong password, counted and (at the threshold) locking in a single UPDATE.

    The lock restarts the count, so after a lockout the account gets `MAX_FAILURES` tries again.
    """
    failures = func.coalesce(User.failed_logins, 0) + 1
    reaches = failures >= MAX_FAILURES
    until = now + LOCKOUT
    row = session.execute(
        update(User)
        .where(User.user_id == user_id, _not_locked(now))
        .values(
            failed_logins=case((reaches, 0), else_=failures),
            locked_until=case((reaches, literal(until, UtcDateTime())), else_=User.locked_until),
        )
        .returning(User.failed_logins, User.locked_until)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:  # another wrong guess locked the account in the meantime
        locked_until = session.scalar(select(User.locked_until).where(User.user_id == user_id))
        return _refused_locked(session, user_id, locked_until, ip)
    count, locked_until = row
    if locked_until is not None and locked_until > now:  # this failure reached the threshold
        detail: dict[str, object] = {"failures": MAX_FAILURES, "locked_until": locked_until.isoformat()}
        audit.record(session=session, actor=user_id, action="login_failed", detail=detail, ip=ip)
        return LoginResult(None, refused="locked", locked_until=locked_until)
    audit.record(session=session, actor=user_id, action="login_failed", detail={"failures": count}, ip=ip)
    return LoginResult(None, refused="invalid")


def _refused_locked(session: Session, user_id: str, locked_until: datetime | None, ip: str | None) -> LoginResult:
    audit.record(session=session, actor=user_id, action="login_locked", ip=ip)
    return LoginResult(None, refused="locked", locked_until=locked_until)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _principal(user: User) -> Principal:
    return Principal(user.user_id, user.name, user.role, user.store_id, user.region_id)


@dataclass(frozen=True)
class PageSession:
    principal: Principal
    csrf_token: str


def session_user(*, session: Session, token: str, now: datetime | None = None) -> PageSession | None:
    """The person behind a session cookie, while the session is open and the user enabled."""
    now = now or datetime.now(UTC)
    row = session.get(WebSession, hash_token(token))
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        return None
    return PageSession(_principal(user), row.csrf_token)


def logout(*, session: Session, token: str, ip: str | None = None) -> bool:
    row = session.get(WebSession, hash_token(token))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(UTC)
    audit.record(session=session, actor=row.user_id, action="logout", ip=ip)
    return True
