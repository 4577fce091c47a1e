"""Request-scoped dependencies shared by the views."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ingest.db import session_scope
from ingest.tokens import authenticate, hash_token


@dataclass(frozen=True)
class AuthenticatedDevice:
    id: int
    store_id: str
    name: str


_token_cache: dict[tuple[int, str], tuple[float, AuthenticatedDevice]] = {}


async def get_db_engine(request: Request) -> Engine:
    # No I/O: async, so FastAPI runs it on the event loop instead of a thread-pool hop.
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_db_engine)]) -> Iterator[Session]:
    # session_scope owns commit / rollback / close; views never commit.
    with session_scope(engine) as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


async def wall_clock() -> datetime:
    """The views' now: what "today" is on the pages. Tests override it with a fixed instant."""
    return datetime.now(UTC)


Now = Annotated[datetime, Depends(wall_clock)]


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _lookup_device(engine: Engine, token: str) -> AuthenticatedDevice | None:
    with session_scope(engine) as session:
        row = authenticate(session=session, token=token)
        return None if row is None else AuthenticatedDevice(row.id, row.store_id, row.name)


async def device_token(request: Request, engine: Annotated[Engine, Depends(get_db_engine)]) -> AuthenticatedDevice:
    token = bearer_token(request)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization: a device token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = (id(engine), hash_token(token))
    hit = _token_cache.get(key)
    now = time.monotonic()
    # A till calls the API several times a second; looking its token up each time cost a third of
    # the request's database round trips. Revocation therefore takes effect within the TTL.
    if hit is not None and now - hit[0] < request.app.state.settings.device_token_cache_s:
        return hit[1]
    device = await run_in_threadpool(_lookup_device, engine, token)
    if device is None:
        _token_cache.pop(key, None)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization: unknown or revoked device token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    _token_cache[key] = (now, device)
    return device


Device = Annotated[AuthenticatedDevice, Depends(device_token)]
