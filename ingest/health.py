"""Health of the ingest path: can the event tables be written, and is the worker storing?

`schema_problem` checks what the event writers need (tables, columns, privileges, TEMP for the
COPY writer's staging tables) with one or two catalogue queries, cached for a few seconds; the
API's `/healthz` and the worker's health endpoint both ask it. `WorkerHealth` is the worker's
own state (failing since when, and why) and `serve_worker_health` answers it over HTTP.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cachetools import TTLCache
from sqlalchemy import Connection, Engine, bindparam, text

from ingest.errors import classify
from ingest.writers.base import COLUMNS

log = logging.getLogger(__name__)

SCHEMA_CHECK_TTL_S = 5.0

# The columns the ingest path writes: the event tables through the writers, the dead letters
# through `ingest.service.dead_letter`, and the store ids every event is checked against.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    **COLUMNS,
    "dead_letters": (
        "received_at", "source", "reason", "raw_payload", "payload_sha256", "event_id", "store_id",
    ),
    "stores": ("store_id",),
}  # fmt: skip
# Privileges the ingest path uses, per table; the other tables are only written.
READ_TOO = frozenset({*COLUMNS, "stores"})

_schema_checks: TTLCache[str, str | None] = TTLCache(maxsize=16, ttl=SCHEMA_CHECK_TTL_S)
_schema_checks_lock = threading.Lock()


def schema_problem(engine: Engine) -> str | None:
    """What keeps the ingest path from writing, or None; cached for a few seconds per database."""
    key = engine.url.render_as_string(hide_password=True)
    with _schema_checks_lock:
        if key in _schema_checks:
            return _schema_checks[key]
    try:
        with engine.connect() as connection:
            problem = _schema_problem(connection)
    except Exception as exc:  # the check itself failing is the problem to report
        problem = classify(exc).reason
    with _schema_checks_lock:
        _schema_checks[key] = problem
    return problem


def forget_schema_checks() -> None:
    with _schema_checks_lock:
        _schema_checks.clear()


def _schema_problem(connection: Connection) -> str | None:
    tables = sorted(REQUIRED_COLUMNS)
    found: list[tuple[str, str]]
    if connection.dialect.name == "postgresql":
        found = [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                    "WHERE c.relnamespace = current_schema()::regnamespace AND c.relname IN :tables "
                    "AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
                ).bindparams(bindparam("tables", expanding=True)),
                {"tables": tables},
            )
        ]
    else:
        found = [
            (table, row[1]) for table in tables for row in connection.exec_driver_sql(f"PRAGMA table_info({table})")
        ]
    columns: dict[str, set[str]] = {}
    for table, column in found:
        columns.setdefault(table, set()).add(column)
    missing_tables = [table for table in tables if table not in columns]
    if missing_tables:
        return f"database schema: table {', '.join(missing_tables)} missing (run `storepulse db upgrade`)"
    missing = [f"{t}.{c}" for t in tables for c in REQUIRED_COLUMNS[t] if c not in columns[t]]
    if missing:
        return f"database schema: column {', '.join(missing)} missing (run `storepulse db upgrade`)"
    if connection.dialect.name == "postgresql":
        return _privilege_problem(connection, tables)
    return None


def _privilege_problem(connection: Connection, tables: list[str]) -> str | None:
    user, database, may_use_temp = connection.execute(
        text("SELECT current_user, current_database(), has_database_privilege(current_database(), 'TEMPORARY')")
    ).one()
    if not may_use_temp:
        return (
            f"database privileges: {user} may not create temporary tables in {database} "
            f"(the COPY writer stages batches in them): GRANT TEMPORARY ON DATABASE {database} TO {user}"
        )
    checks = connection.execute(
        text(
            "SELECT t, has_table_privilege(quote_ident(t), CASE WHEN t IN :read_too "
            "THEN 'SELECT,INSERT' ELSE 'INSERT' END) FROM unnest(CAST(:tables AS text[])) AS t"
        ).bindparams(bindparam("read_too", expanding=True)),
        {"tables": tables, "read_too": sorted(READ_TOO & set(tables))},
    ).all()
    denied = [table for table, allowed in checks if not allowed]
    if denied:
        return f"database privileges: {user} may not write {', '.join(denied)}"
    return None


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


@dataclass
class _Failure:
    reason: str
    since: datetime
    retries: int
    kept_messages: int


class WorkerHealth:
    """Whether the worker stores what it receives; updated by its loop, read by the health endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failure: _Failure | None = None
        self.last_commit_at: datetime | None = None

    def failing(self, reason: str, *, kept_messages: int) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = _Failure(reason, datetime.now(UTC), 1, kept_messages)
            else:
                self._failure.reason = reason
                self._failure.retries += 1
                self._failure.kept_messages = kept_messages

    def stored(self) -> None:
        with self._lock:
            self._failure = None
            self.last_commit_at = datetime.now(UTC)

    def report(self) -> dict[str, Any] | None:
        """The current failure as the health endpoint shows it, or None while storing works."""
        with self._lock:
            failure = self._failure
            if failure is None:
                return None
            return {
                "status": "failing",
                "reason": failure.reason,
                "since": iso(failure.since),
                "retries": failure.retries,
                "kept_messages": failure.kept_messages,
            }


def serve_worker_health(
    host: str, port: int, answer: Callable[[], tuple[int, dict[str, Any]]]
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """`GET /healthz` (or `/`) answering `answer()` as JSON, from a daemon thread; stop with `shutdown()`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", "/healthz"):
                self._send(404, {"detail": "not found; the health endpoint is /healthz"})
                return
            try:
                status, body = answer()
            except Exception as exc:  # a broken health check must still answer, and red
                log.exception("health check failed")
                status, body = 503, {"status": "failing", "reason": f"health check: {classify(exc).reason}"}
            self._send(status, body)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ingest-health", daemon=True)
    thread.start()
    return server, thread
