"""Request-scoped dependencies shared by the views."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ingest.db import session_scope
from ingest.models import DeviceToken
from ingest.tokens import authenticate


async def get_db_engine(request: Request) -> Engine:
    # No I/O: async, so FastAPI runs it on the event loop instead of a thread-pool hop.
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_db_engine)]) -> Iterator[Session]:
    # session_scope owns commit / rollback / close; views never commit.
    with session_scope(engine) as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def device_token(request: Request, engine: Annotated[Engine, Depends(get_db_engine)]) -> DeviceToken:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization: a device token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with session_scope(engine) as session:
        row = authenticate(session=session, token=token.strip())
    if row is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="Authorization: unknown or revoked device token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return row


Device = Annotated[DeviceToken, Depends(device_token)]
