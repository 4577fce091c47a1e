"""PostgreSQL / TimescaleDB writer: binary COPY into a staging table, then one idempotent INSERT.

COPY is the fastest way into PostgreSQL but cannot skip existing keys, so each batch of events
lands in a temporary table first and moves with ``INSERT … SELECT … ON CONFLICT DO NOTHING``
inside the caller's transaction; ``RETURNING`` tells which events were new. Their child rows
(receipt lines, stock lots) are copied straight into their hypertables: they are new by
construction, and they are the bulk of the volume.
"""

from __future__ import annotations

from datetime import UTC
from functools import cache
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_dumps
from sqlalchemy import Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from ingest.errors import BatchRefused
from ingest.models import Base
from ingest.writers.base import COLUMNS, EventWriter, RowSet, children_of_accepted

_PG_DIALECT = postgresql.dialect()


def _dump_json(value: Any) -> bytes:
    return orjson.dumps(value, default=str)


# Every event carries its raw payload into a jsonb column: orjson serialises it several
# times faster than the standard library, which shows at tens of thousands of events a second.
set_json_dumps(_dump_json)


def _copy_type(sql_type: str) -> str:
    sql_type = sql_type.upper()
    for prefix, name in (
        ("VARCHAR", "varchar"),
        ("TEXT", "text"),
        ("NUMERIC", "numeric"),
        ("TIMESTAMP", "timestamptz"),
        ("JSONB", "jsonb"),
        ("DATE", "date"),
        ("BIGINT", "int8"),
        ("INTEGER", "int4"),
        ("BOOLEAN", "bool"),
    ):
        if sql_type.startswith(prefix):
            return name
    raise TypeError(f"no COPY type for {sql_type}")


@cache
def _copy_types(table_name: str) -> list[str]:
    table: Table = Base.metadata.tables[table_name]
    return [_copy_type(table.c[name].type.compile(dialect=_PG_DIALECT)) for name in COLUMNS[table_name]]


def staging_name(table: str) -> str:
    return f"stage_{table}"


class PostgresCopyWriter(EventWriter):
    dialect = "postgresql"

    def _store(self, rows: RowSet, *, session: Session) -> dict[str, set[int]]:
        try:
            return self._copy_and_insert(rows, session)
        except orjson.JSONEncodeError as exc:
            # e.g. an unpaired surrogate in an unknown extra field of the raw payload
            raise BatchRefused(f"raw payload cannot be stored as JSON ({exc})") from exc
        except psycopg.Error as exc:
            # Speak SQLAlchemy's exception language like every other path, so callers
            # tell data errors (refuse the event) from connection errors (retry) the same way.
            wrapped = sa_exc.DBAPIError.instance(None, None, exc, psycopg.Error)
            raise wrapped from exc

    def _copy_and_insert(self, rows: RowSet, session: Session) -> dict[str, set[int]]:
        connection: Any = session.connection().connection.driver_connection
        accepted: dict[str, set[int]] = {}
        with connection.cursor() as cursor:
            for table, header_rows in rows.headers.items():
                self._copy(cursor, table, header_rows)
                cursor.execute(self._insert_sql(table))
                index_of = {(row[0], row[1].astimezone(UTC)): position for position, row in enumerate(header_rows)}
                accepted[table] = {
                    index_of[(event_id, occurred_at.astimezone(UTC))] for event_id, occurred_at in cursor.fetchall()
                }
        for table in rows.children:
            child_rows = children_of_accepted(rows, table, accepted)
            if child_rows:
                copy_rows_raw(session, table, child_rows)
        return accepted

    @staticmethod
    def _copy(cursor: Any, table: str, rows: list[tuple[Any, ...]]) -> None:
        stage = staging_name(table)
        columns = ", ".join(COLUMNS[table])
        # ON COMMIT DELETE ROWS empties the stage at every commit, so a pooled connection
        # never carries one batch's rows into the next. The stage is made of exactly the
        # written columns: while one of them is missing from the table (a botched migration)
        # no stage can be created, so none outlives the repair without that column.
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS "
            f"AS SELECT {columns} FROM {table} WITH NO DATA"
        )
        # Empty already unless the caller wrote twice in one transaction; DELETE is cheaper than TRUNCATE.
        cursor.execute(f"DELETE FROM {stage}")
        with cursor.copy(f"COPY {stage} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_copy_types(table))
            for row in rows:
                copy.write_row(row)

    @staticmethod
    @cache
    def _insert_sql(table: str) -> str:
        columns = ", ".join(COLUMNS[table])
        return (
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging_name(table)} "
            "ON CONFLICT DO NOTHING RETURNING event_id, occurred_at"
        )


def copy_rows_raw(session: Session, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Plain binary COPY straight into a table (new child rows; the benchmark's raw baseline)."""
    connection: Any = session.connection().connection.driver_connection
    columns = ", ".join(COLUMNS[table])
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_copy_types(table))
        for row in rows:
            copy.write_row(row)
