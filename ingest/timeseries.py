"""The few time-series specifics of TimescaleDB, kept in one module.

Chunk intervals are sized for the dashboards' queries (one store over a day, a week or a
month). A few thousand stores write a few million sale lines a day: one-day chunks for the
high-volume tables keep the chunk being written (and its indexes) in memory and let a day
be compressed or dropped whole. Footfall and stock arrive at a fixed, lower rate (one row
per sensor per 15 min, one per SKU per snapshot), so a week per chunk keeps chunk counts low.
Every table carries a (store_id, occurred_at) index: the dashboards always filter by store
(or region = a list of stores) and a time range, and TimescaleDB prunes chunks by time first.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHUNK_INTERVALS: dict[str, str] = {
    "receipts": "1 day",
    "receipt_lines": "1 day",
    "consultation_steps": "1 day",
    "prompt_answers": "1 day",
    "footfall": "7 days",
    "stock_snapshots": "7 days",
    "stock_lots": "7 days",
}


def timescaledb_available(connection: Connection) -> bool:
    if connection.dialect.name != "postgresql":
        return False
    return bool(
        connection.execute(text("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")).scalar()
    )


def create_hypertables(connection: Connection) -> bool:
    """Turn the event tables into hypertables when TimescaleDB is there; plain tables otherwise."""
    if not timescaledb_available(connection):
        if connection.dialect.name == "postgresql":
            log.warning("timescaledb extension not available: event tables stay plain PostgreSQL tables")
        return False
    connection.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
    for table, interval in CHUNK_INTERVALS.items():
        connection.execute(
            text(
                f"SELECT create_hypertable('{table}', 'occurred_at', "
                f"chunk_time_interval => INTERVAL '{interval}', if_not_exists => TRUE, migrate_data => TRUE, "
                f"create_default_indexes => FALSE)"
            )
        )
    return True


def hypertables(session: Session) -> dict[str, str]:
    """Hypertable name → chunk interval, for health pages and tests."""
    if session.get_bind().dialect.name != "postgresql":
        return {}
    has_ext = session.execute(text("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
    if not has_ext:
        return {}
    rows = session.execute(
        text(
            "SELECT hypertable_name, time_interval::text FROM timescaledb_information.dimensions "
            "WHERE hypertable_schema = current_schema()"
        )
    )
    return {name: interval for name, interval in rows}


def business_window(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of a local business day, in UTC (a DST day is 23 or 25 hours long)."""
    following = day + timedelta(days=1)
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    end = datetime(following.year, following.month, following.day, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)
