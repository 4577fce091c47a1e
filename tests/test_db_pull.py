"""POS database pull from a 思迅-like t_rm_saleflow: increments, late rows in the overlap, kill -9 and restart.

The source table lives in its own database (a separate SQLite file, or a separate PostgreSQL
database beside the TimescaleDB one); StorePulse is the usual `engine` fixture, so each test runs
SQLite → SQLite and PostgreSQL → TimescaleDB.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

from adapters.sources.db_pull import load_profile, pull_once
from adapters.sources.importer import LocalDestination, load_context
from ingest.db import session_scope
from ingest.models import DeadLetter, ImportWatermark, Receipt, ReceiptLine, SourceMapping
from tests.conftest import PG_ADMIN_URL, load_small_chain

PROFILE = "siss_test"
START = datetime(2024, 3, 1, 8, 0, 0)  # the POS server's local time (Asia/Shanghai)
BRANCH_STORES = {"01": "S001", "02": "S002", "03": "S003"}
STOREPULSE = [sys.executable, "-m", "storepulse"]

CREATE = """
CREATE TABLE t_rm_saleflow (
    branch_no VARCHAR(6) NOT NULL, flow_no VARCHAR(20) NOT NULL, flow_id INTEGER NOT NULL,
    item_no VARCHAR(20) NOT NULL, sale_qnty NUMERIC(16, 4) NOT NULL, sale_price NUMERIC(16, 4) NOT NULL,
    sale_money NUMERIC(16, 4) NOT NULL, sell_way CHAR(1) NOT NULL, oper_date {timestamp} NOT NULL,
    oper_id VARCHAR(10), pos_id VARCHAR(4)
)
"""
QUERY = """SELECT branch_no, flow_no, flow_id, item_no, sale_qnty, sale_price, sale_money, sell_way, oper_date,
       oper_id, pos_id
FROM t_rm_saleflow WHERE oper_date >= :watermark ORDER BY oper_date, branch_no, flow_no, flow_id"""


@dataclass(frozen=True)
class Row:
    branch_no: str
    flow_no: str
    flow_id: int
    item_no: str
    sale_qnty: Decimal
    sale_price: Decimal
    sale_money: Decimal
    sell_way: str
    oper_date: datetime
    oper_id: str
    pos_id: str

    @property
    def stored_amount(self) -> Decimal:
        """What StorePulse must store for the row: cents half up, negative for a return."""
        cents = self.sale_money.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        return -cents if self.sell_way == "B" else cents


def flows(first_flow: int, count_rows: int, start: datetime, *, step: timedelta = timedelta(minutes=1)) -> list[Row]:
    """Flows of 1–5 rows, one oper_date per flow, `step` apart; every 7th flow a return."""
    rows: list[Row] = []
    number = first_flow
    while len(rows) < count_rows:
        branch = f"0{number % 3 + 1}"
        sell_way = "B" if number % 7 == 0 else "A"
        moment = start + step * (number - first_flow)
        for line in range(1, number % 5 + 2):
            if len(rows) == count_rows:
                break
            qty = Decimal(line % 3 + 1)
            price = Decimal(f"{(number * 37 + line * 11) % 9000 / 100 + 1:.2f}")
            # Every 11th line carries 思迅's 4 decimals (a discounted price): rounded half up to cents.
            money = qty * price - (Decimal("0.0050") if (number + line) % 11 == 0 else Decimal(0))
            rows.append(Row(branch, f"F{number:08d}", line, f"69{number % 400:011d}", qty, price, money, sell_way,
                            moment, f"10{number % 9}", str(number % 4 + 1)))  # fmt: skip
        number += 1
    return rows


def insert(source: Engine, rows: list[Row]) -> None:
    with source.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO t_rm_saleflow VALUES (:branch_no, :flow_no, :flow_id, :item_no, :sale_qnty, "
                ":sale_price, :sale_money, :sell_way, :oper_date, :oper_id, :pos_id)"
            ),
            [
                {**row.__dict__, "oper_date": row.oper_date.strftime("%Y-%m-%d %H:%M:%S")
                 if source.dialect.name == "sqlite" else row.oper_date,
                 "sale_qnty": str(row.sale_qnty), "sale_price": str(row.sale_price),
                 "sale_money": str(row.sale_money)}
                for row in rows
            ],
        )  # fmt: skip


@pytest.fixture
def source_url(engine: Engine, tmp_path: Path) -> Iterator[str]:
    """A 思迅-like POS database of the same kind as the StorePulse one, with an empty t_rm_saleflow."""
    if engine.dialect.name == "sqlite":
        url = f"sqlite:///{tmp_path / 'siss.db'}"
        timestamp = "TEXT"
    else:
        name = f"siss_src_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        timestamp = "TIMESTAMP"
    source = create_engine(url)
    with source.begin() as conn:
        conn.execute(text(CREATE.format(timestamp=timestamp)))
    source.dispose()
    yield url
    if engine.dialect.name != "sqlite":
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def profile_path(source_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The password-less test URL still goes through the ${VAR} substitution a real profile uses.
    monkeypatch.setenv("SISS_TEST_URL", source_url)
    path = tmp_path / f"{PROFILE}.db.yaml"
    shipped = yaml.safe_load(Path("seeds/import_profiles/siss_saleflow.db.yaml").read_text(encoding="utf-8"))
    profile = {**shipped, "name": PROFILE, "database_url": "${SISS_TEST_URL}", "query": QUERY, "batch_size": 25}
    path.write_text(yaml.safe_dump(profile, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def mapped_chain(engine: Engine) -> Engine:
    load_small_chain(engine)
    with session_scope(engine) as session:
        session.add_all(
            SourceMapping(kind="store", source=f"db:{PROFILE}", external_id=branch, target_id=store)
            for branch, store in BRANCH_STORES.items()
        )
    return engine


def stored(engine: Engine) -> tuple[int, int, Decimal, Decimal]:
    """(receipts, lines, Σ sale line amounts, Σ return line amounts) as StorePulse has them."""
    with session_scope(engine) as session:
        receipts = session.scalar(select(func.count()).select_from(Receipt))
        lines = session.scalar(select(func.count()).select_from(ReceiptLine))
        sales = session.scalar(select(func.coalesce(func.sum(ReceiptLine.amount), 0)).where(ReceiptLine.kind == "sale"))
        returns = session.scalar(
            select(func.coalesce(func.sum(ReceiptLine.amount), 0)).where(ReceiptLine.kind == "return")
        )
    return int(receipts or 0), int(lines or 0), Decimal(sales or 0), Decimal(returns or 0)


def receipt_count(engine: Engine) -> int:
    if engine.dialect.name == "sqlite":
        # A plain sqlite3 read: in WAL mode it never queues for the puller's write lock.
        import sqlite3

        with closing(sqlite3.connect(str(engine.url.database), isolation_level=None)) as connection:
            return int(connection.execute("SELECT count(*) FROM receipts").fetchone()[0])
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Receipt)) or 0)


def expected(rows: list[Row]) -> tuple[int, int, Decimal, Decimal]:
    receipts = len({(r.branch_no, r.flow_no, r.sell_way) for r in rows})
    sales = sum((r.stored_amount for r in rows if r.sell_way == "A"), Decimal(0))
    returns = sum((r.stored_amount for r in rows if r.sell_way == "B"), Decimal(0))
    return receipts, len(rows), sales, returns


def watermark(engine: Engine) -> str | None:
    with session_scope(engine) as session:
        row = session.get(ImportWatermark, PROFILE)
        return row.watermark if row is not None else None


def pull(engine: Engine, profile_path: Path) -> tuple[int, int, int]:
    profile = load_profile(str(profile_path))
    with session_scope(engine) as session:
        context = load_context(session=session, source=profile.source_name)
    result = pull_once(
        profile, store=engine, context=context, destination=LocalDestination(engine, source=profile.source_name)
    )
    assert result.outcome.error is None and not result.outcome.report.skipped, result.outcome.as_dict()
    delivered = result.outcome.delivery
    return delivered["accepted"], delivered["duplicate"], delivered["rejected"]


def test_three_increments_and_late_rows_store_every_row_once(mapped_chain: Engine, source_url: str,
                                                             profile_path: Path) -> None:  # fmt: skip
    source = create_engine(source_url)
    everything = flows(1, 10_000, START)
    cut_1 = next(i for i, r in enumerate(everything) if i >= 4000 and r.flow_id == 1)
    cut_2 = next(i for i, r in enumerate(everything) if i >= 7000 and r.flow_id == 1)
    first, second, third = everything[:cut_1], everything[cut_1:cut_2], everything[cut_2:]
    overlap_flows = 31  # the saved watermark's flow and the 30 one minute apart before it: read again

    insert(source, first)
    assert pull(mapped_chain, profile_path) == (expected(first)[0], 0, 0)
    assert watermark(mapped_chain) == str(first[-1].oper_date)
    assert stored(mapped_chain) == expected(first)

    insert(source, second)
    assert pull(mapped_chain, profile_path) == (expected(second)[0], overlap_flows, 0)
    assert watermark(mapped_chain) == str(second[-1].oper_date)

    # Rows a till commits late, under an oper_date 10 minutes older than the saved watermark.
    late = flows(900_001, 60, second[-1].oper_date - timedelta(minutes=10), step=timedelta(seconds=1))
    insert(source, late)
    insert(source, third)
    assert pull(mapped_chain, profile_path) == (expected(late)[0] + expected(third)[0], overlap_flows, 0)
    # Nothing new: the overlap comes back as duplicates only.
    assert pull(mapped_chain, profile_path) == (0, overlap_flows, 0)

    every_row = everything + late
    assert len(every_row) == 10_060
    assert stored(mapped_chain) == expected(every_row)
    with session_scope(mapped_chain) as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0
        mark = session.get(ImportWatermark, PROFILE)
        assert mark is not None and mark.watermark == str(third[-1].oper_date)
        # Rows read, overlaps included.
        assert mark.rows_total > len(every_row)
        receipt = session.scalars(select(Receipt).where(Receipt.receipt_id == "F00000007")).one()
        assert (receipt.kind, receipt.store_id, receipt.source_name) == ("return", "S002", f"db:{PROFILE}")
        assert receipt.occurred_at == datetime(2024, 3, 1, 0, 6, tzinfo=UTC)  # 08:06 in Asia/Shanghai
    source.dispose()


def test_a_pull_killed_mid_increment_resumes_without_doubles(mapped_chain: Engine, source_url: str,
                                                             profile_path: Path) -> None:  # fmt: skip
    source = create_engine(source_url)
    env = {**os.environ, "STOREPULSE_DATABASE_URL": mapped_chain.url.render_as_string(hide_password=False)}
    command = [*STOREPULSE, "import", "db", "--profile", str(profile_path), "--once"]
    small = flows(1, 1_000, START)
    insert(source, small)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before = stored(mapped_chain)
    assert before == expected(small)
    saved = watermark(mapped_chain)

    big = flows(10_001, 9_000, small[-1].oper_date + timedelta(minutes=1))
    insert(source, big)
    puller = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while receipt_count(mapped_chain) == before[0]:  # until its first chunk (25 receipts) committed
        assert puller.poll() is None, "the pull ended before its first chunk was seen"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(puller.pid, signal.SIGKILL)
    assert puller.wait(timeout=30) == -signal.SIGKILL
    half = stored(mapped_chain)
    assert before[0] < half[0] < before[0] + expected(big)[0], "killed mid-pull: some chunks stored, not all"
    assert watermark(mapped_chain) == saved, "the watermark moves only with the last chunk"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    duplicates = half[0] - before[0] + 31  # what the killed pull stored, and the overlap
    assert f"events accepted {expected(big)[0] - (half[0] - before[0])}, duplicate {duplicates}, rejected 0" in (
        again.stdout
    )
    assert stored(mapped_chain) == expected(small + big)
    assert watermark(mapped_chain) == str(big[-1].oper_date)
    source.dispose()


def test_the_pull_loop_stops_cleanly_on_sigterm(mapped_chain: Engine, source_url: str, profile_path: Path) -> None:
    source = create_engine(source_url)
    rows = flows(1, 300, START)
    insert(source, rows)
    env = {**os.environ, "STOREPULSE_DATABASE_URL": mapped_chain.url.render_as_string(hide_password=False)}
    command = [*STOREPULSE, "import", "db", "--profile", str(profile_path), "--interval", "0.2"]
    puller = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while watermark(mapped_chain) is None:
        assert puller.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    puller.send_signal(signal.SIGTERM)
    out, err = puller.communicate(timeout=60)
    assert puller.returncode == 0, err
    assert "SIGTERM: stopping after the current step" in err
    assert out.rstrip().endswith(f"{PROFILE}: stopped")
    assert stored(mapped_chain) == expected(rows)
    source.dispose()


def test_profile_errors_name_the_field(tmp_path: Path) -> None:
    from adapters.sources.db_pull import ProfileError

    path = tmp_path / "bad.db.yaml"
    bad = {"name": "bad", "database_url": "sqlite://", "query": "SELECT 1", "watermark": {"column": "oper_date"}}
    path.write_text(yaml.safe_dump({**bad, "receipt": {}}), encoding="utf-8")
    with pytest.raises(ProfileError, match=r"bad.db.yaml: query: Value error, the query must compare"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match=r"no database profile 'nope'.*shipped: siss_saleflow"):
        load_profile("nope")
    shipped = load_profile("siss_saleflow")
    os.environ.pop("SISS_DB_PASSWORD", None)
    with pytest.raises(ProfileError, match="database_url: environment variable SISS_DB_PASSWORD is not set"):
        shipped.resolved_url()
