"""Telling bad data from a broken environment: the one place that decides what a failure means.

- **data**: the event can never be stored as it is (a value the database refuses, a broken
  constraint). It goes to the dead letters with its reason, and the stream goes on.
- **environment**: the database, its schema, its privileges, its disk or the network is broken.
  The event is fine and must be kept: the MQTT worker stops acknowledging and retries, the HTTP
  API answers 503, `/healthz` turns red.

Anything not known to be a data error is an environment error. A good event dead-lettered
silently drops out of every number, while a bad event retried only holds the stream up until
someone reads the error that says why.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Literal

import psycopg
import psycopg.errors
from sqlalchemy import exc as sa_exc

ErrorKind = Literal["data", "environment"]

# SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) are about the
# values sent; every other class (08 connection, 25 transaction state, 40 rollback, 42 schema
# and privileges, 53 resources, 57 operator intervention, 58 system, XX internal) is about the
# database the values were sent to.
DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})

# SQLite result codes about the values: constraint violations (CHECK, NOT NULL, UNIQUE, ...),
# a datatype mismatch, a string or blob too big. Everything else (SQLITE_ERROR for a missing
# table or column, SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, ...)
# is about the database file or its schema.
DATA_SQLITE_ERRORS = ("SQLITE_CONSTRAINT", "SQLITE_MISMATCH", "SQLITE_TOOBIG")

_STATEMENT_POSITION = re.compile(r" at character \d+$")


class BatchRefused(Exception):
    """The database refused a value of the batch (a data error): retrying the same rows won't help."""


@dataclass(frozen=True)
class Diagnosis:
    kind: ErrorKind
    reason: str

    @property
    def is_data(self) -> bool:
        return self.kind == "data"


def first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    # The server adds where in the statement the error was found when it has the text; the same
    # failure then reads the same whichever way the statement was sent.
    return _STATEMENT_POSITION.sub("", line)[:limit]


def classify(exc: BaseException) -> Diagnosis:
    """Whether `exc` is about the data (dead-letter it) or about the environment (keep it, retry)."""
    if isinstance(exc, BatchRefused):
        return Diagnosis("data", first_line(str(exc)))
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.orig is not None and not exc.connection_invalidated:
            return _classify_driver_error(exc.orig)
        return Diagnosis("environment", f"database connection lost: {first_line(str(exc.orig or exc))}")
    if isinstance(exc, psycopg.Error | sqlite3.Error):
        return _classify_driver_error(exc)
    if isinstance(exc, sa_exc.TimeoutError):
        return Diagnosis("environment", f"no free database connection: {first_line(str(exc))}")
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return Diagnosis("environment", f"database: {type(exc).__name__}: {first_line(str(exc))}")
    if isinstance(exc, OSError):
        return Diagnosis("environment", f"{type(exc).__name__}: {first_line(str(exc))}")
    return Diagnosis("environment", f"internal error {type(exc).__name__}: {first_line(str(exc))}")


def _classify_driver_error(error: BaseException) -> Diagnosis:
    message = first_line(str(error))
    if isinstance(error, psycopg.Error):
        code = error.sqlstate
        if code is None:
            # Raised by psycopg itself, before the server saw anything: a value it cannot send
            # (e.g. NUL in text) is a data error; a lost or closed connection is not.
            if isinstance(error, psycopg.DataError):
                return Diagnosis("data", message)
            return Diagnosis("environment", f"database connection: {message}")
        if code[:2] in DATA_SQLSTATE_CLASSES:
            return Diagnosis("data", message)
        return Diagnosis("environment", f"database: {message} (SQLSTATE {code} {_sqlstate_name(code)})")
    if isinstance(error, sqlite3.Error):
        name = getattr(error, "sqlite_errorname", None)
        is_data = (
            name.startswith(DATA_SQLITE_ERRORS)
            if name
            else isinstance(error, sqlite3.IntegrityError | sqlite3.DataError)
        )
        if is_data:
            return Diagnosis("data", message)
        return Diagnosis("environment", f"database: {message} ({name or type(error).__name__})")
    return Diagnosis("environment", f"database: {type(error).__name__}: {message}")


def _sqlstate_name(code: str) -> str:
    try:
        return psycopg.errors.lookup(code).__name__.rstrip("_")
    except KeyError:
        return "unknown condition"
