"""The drop folder as an operator runs it: a real `storepulse import watch` killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine, func, select

from ingest.db import session_scope
from ingest.models import ImportFile, Receipt, ReceiptLine
from tests.conftest import load_small_chain

HEADER = "门店编码,销售单号,收银机号,销售日期,销售时间,商品编码,商品名称,数量,单价,应收金额,实收金额,会员卡号,营业员\n"
BIG = 10  # the file that is half-imported when the watcher is killed
BIG_RECEIPTS = 2500
SMALL_RECEIPTS = 3


def export(number: int) -> tuple[str, int, Decimal]:
    """A 海典-style export: (CSV text, receipts, Σ paid amounts); two lines per receipt."""
    receipts = BIG_RECEIPTS if number == BIG else SMALL_RECEIPTS
    rows, paid = [], Decimal(0)
    for receipt in range(receipts):
        for line in (1, 2):
            price = Decimal(f"{(number * 31 + receipt * 7 + line) % 50 + 1}.50")
            rows.append(f"S00{receipt % 3 + 1},XS{number:03d}{receipt:05d},1,2024-06-{number % 28 + 1:02d},"
                        f"{8 + receipt % 12:02d}:{receipt % 60:02d}:00,69{line:011d},药品{line},1,{price},{price},"
                        f"{price},,E0101\n")  # fmt: skip
            paid += price
    return HEADER + "".join(rows), receipts, paid


def drop(directory: Path, number: int) -> None:
    body, _, _ = export(number)
    target = directory / f"sales_{number:02d}.csv"
    if number % 2:  # written as *.tmp, then renamed: never seen half-written
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(body, encoding="utf-8")
        os.replace(temporary, target)
    else:  # written in place, in two parts: taken only once size and mtime settled
        half = len(body) // 2
        with target.open("w", encoding="utf-8") as handle:
            handle.write(body[:half])
            handle.flush()
            time.sleep(0.05)
            handle.write(body[half:])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def receipts_of(engine: Engine, number: int) -> int:
    pattern = f"XS{number:03d}%"
    if engine.dialect.name == "sqlite":
        # A plain sqlite3 read: in WAL mode it never queues for the watcher's write lock, as the
        # engine's BEGIN IMMEDIATE would (and then see only the end of the import).
        import sqlite3

        with closing(sqlite3.connect(str(engine.url.database), isolation_level=None)) as connection:
            (count,) = connection.execute(
                "SELECT count(*) FROM receipts WHERE receipt_id LIKE ?", (pattern,)
            ).fetchone()
        return int(count)
    with engine.connect() as conn:
        count = conn.scalar(select(func.count()).select_from(Receipt).where(Receipt.receipt_id.like(pattern)))
    return int(count or 0)


def test_twenty_files_with_kills_are_each_imported_once(engine: Engine, tmp_path: Path) -> None:
    load_small_chain(engine)
    folder = tmp_path / "drop"
    folder.mkdir()
    env = {**os.environ, "STOREPULSE_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    command = [sys.executable, "-m", "storepulse", "import", "watch", str(folder), "--adapter",
               "sales:hydee_pos_export", "--settle", "0.3", "--poll", "0.05", "--chunk-size", "250"]  # fmt: skip
    logs = [tmp_path / f"watch-{n}.log" for n in range(3)]

    def start(n: int) -> subprocess.Popen[bytes]:
        with logs[n].open("wb") as log:
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def done(number: int) -> bool:
        name = f"sales_{number:02d}.csv"
        return (folder / "done" / name).exists() and (folder / "done" / f"{name}.report.json").exists()

    watcher = start(0)
    for number in range(7):
        drop(folder, number)
    wait_for(lambda: done(0), "the first file in done/")
    watcher.send_signal(signal.SIGKILL)
    assert watcher.wait(timeout=30) == -signal.SIGKILL

    for number in range(7, 14):  # dropped while no watcher runs
        drop(folder, number)
    watcher = start(1)
    # Killed while the big file is half stored: its first chunk committed, the rest not.
    wait_for(lambda: receipts_of(engine, BIG) > 0, "the big file's first chunk")
    watcher.send_signal(signal.SIGKILL)
    assert watcher.wait(timeout=30) == -signal.SIGKILL
    half = receipts_of(engine, BIG)
    assert 0 < half < BIG_RECEIPTS and not done(BIG), "the big file was killed half-imported"
    with session_scope(engine) as session:
        assert session.get(ImportFile, _sha(folder / f"sales_{BIG:02d}.csv")).status == "importing"  # type: ignore[union-attr]

    watcher = start(2)
    for number in range(14, 20):
        drop(folder, number)
    wait_for(lambda: all(done(n) for n in range(20)), "all 20 files in done/")
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=60) == 0
    assert f"{folder}: stopped" in logs[2].read_text(encoding="utf-8")

    exports = [export(n) for n in range(20)]
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Receipt)) == sum(e[1] for e in exports)
        assert session.scalar(select(func.count()).select_from(ReceiptLine)) == 2 * sum(e[1] for e in exports)
        assert Decimal(session.scalar(select(func.sum(Receipt.total))) or 0) == sum(e[2] for e in exports)
        statuses = session.execute(select(ImportFile.name, ImportFile.status)).all()
    assert sorted(statuses) == [(f"sales_{n:02d}.csv", "done") for n in range(20)]
    assert sorted(p.name for p in folder.iterdir()) == ["done", "failed"]
    assert list((folder / "failed").iterdir()) == []
    big = json.loads((folder / "done" / f"sales_{BIG:02d}.csv.report.json").read_text(encoding="utf-8"))
    # Imported again after the kill: what the killed run stored came back as duplicates.
    assert big["events"] == {"accepted": BIG_RECEIPTS - half, "duplicate": half, "rejected": 0, "sent": 0}
    small = json.loads((folder / "done" / "sales_19.csv.report.json").read_text(encoding="utf-8"))
    assert small["events"] == {"accepted": SMALL_RECEIPTS, "duplicate": 0, "rejected": 0, "sent": 0}
    assert small["counts"]["rows"] == 2 * SMALL_RECEIPTS


def _sha(path: Path) -> str:
    from adapters.sources.drop_folder import file_sha256

    return file_sha256(path)


def test_unreadable_file_goes_to_failed_with_its_report(engine: Engine, tmp_path: Path) -> None:
    from adapters.sources.drop_folder import DropFolder
    from adapters.sources.importer import LocalDestination, load_context

    load_small_chain(engine)
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "broken.csv").write_text("this,is\nnot,an export\n", encoding="utf-8")
    (folder / "half.csv.tmp").write_text(HEADER, encoding="utf-8")
    watcher = DropFolder(folder, adapter_spec="sales:hydee_pos_export", store=engine,
                         destination=LocalDestination(engine, source="import:watch"),
                         context_for=lambda source: load_context(session=None, source=source), settle_s=0)  # fmt: skip
    assert watcher.ready_files() == []  # first sight: not yet known to be stable
    ready = watcher.ready_files()
    assert ready == [folder / "broken.csv"]
    result = watcher.process(ready[0])
    assert result.status == "failed" and result.moved_to == folder / "failed" / "broken.csv"
    report = json.loads((folder / "failed" / "broken.csv.report.json").read_text(encoding="utf-8"))
    assert report["error"].startswith("file not imported: ")
    assert (folder / "half.csv.tmp").exists()
