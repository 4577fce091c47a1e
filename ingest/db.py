"""Engines and sessions. `session_scope` is the one place that commits, rolls back and closes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ingest.settings import get_settings


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and use psycopg 3 for them."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "timescaledb"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's legacy transaction handling begins a transaction only before DML and commits at
    # the first RELEASE SAVEPOINT, so a batch's events would commit before their hooks and dead
    # letters ran. SQLAlchemy's documented recipe: pysqlite emits no BEGIN of its own ...
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the dashboard read while the simulator and HTTP ingest write.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # ... and SQLAlchemy's BEGIN opens every transaction. IMMEDIATE takes the write lock at once
    # (waiting up to busy_timeout): a deferred transaction that reads and then writes fails with
    # SQLITE_BUSY, without waiting, when another connection committed in between.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    url = normalise_url(url or get_settings().effective_database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    settings = get_settings()
    # No pre-ping: it costs a round trip per checkout. A connection the server dropped fails one
    # statement, and SQLAlchemy then invalidates the whole pool; recycling bounds idle-connection age.
    return create_engine(url, pool_recycle=1800, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)


@lru_cache(maxsize=8)
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """Commit on success, roll back on any error, always close."""
    session = _session_factory(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres(engine_or_session: Engine | Session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


def database_ok(engine: Engine | None = None) -> tuple[bool, str]:
    try:
        with (engine or get_engine()).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True, "ok"
    except Exception as exc:  # any driver error means "not ready"
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
