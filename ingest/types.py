"""Column types that behave the same on TimescaleDB and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Numeric
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# JSONB on PostgreSQL (indexable, compact); JSON text on SQLite.
JsonDoc = JSON().with_variant(JSONB(), "postgresql")
Money = Numeric(14, 2)
Quantity = Numeric(14, 3)


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps are stored in UTC and always come back timezone-aware.

    SQLite has no timezone type, so without this a round trip would silently
    turn aware datetimes into naive ones.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime passed to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
