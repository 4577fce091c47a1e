"""SQLite writer for the embedded default: ``INSERT OR IGNORE … RETURNING`` in the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from ingest.models import Base
from ingest.writers.base import COLUMNS, EventWriter, RowSet, children_of_accepted


class SqliteWriter(EventWriter):
    dialect = "sqlite"

    def _store(self, rows: RowSet, *, session: Session) -> dict[str, set[int]]:
        accepted: dict[str, set[int]] = {}
        for table_name, header_rows in rows.headers.items():
            table = Base.metadata.tables[table_name]
            columns = COLUMNS[table_name]
            inserted: set[int] = set()
            statement = insert(table).prefix_with("OR IGNORE")
            # One row at a time: SQLite reports per statement whether the row was new,
            # and row-wise inserts inside one transaction are cheap on SQLite.
            for position, row in enumerate(header_rows):
                result: Any = session.execute(statement, dict(zip(columns, row, strict=True)))
                if result.rowcount == 1:
                    inserted.add(position)
            accepted[table_name] = inserted
        for table_name in rows.children:
            child_rows = children_of_accepted(rows, table_name, accepted)
            if child_rows:
                columns = COLUMNS[table_name]
                session.execute(
                    insert(Base.metadata.tables[table_name]),
                    [dict(zip(columns, row, strict=True)) for row in child_rows],
                )
        return accepted
