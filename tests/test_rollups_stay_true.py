"""Rollups never go stale and a batch commits whole: late data, refresh races, starvation, revisions."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from ingest.db import session_scope
from ingest.models import DeadLetter, Receipt, RollupDirty, RollupStoreDay, RollupStoreHour, Store
from ingest.service import ingest_payloads
from store_rules import rollups
from store_rules.metrics import insurance_pass_rate
from tests.test_metrics import DAY, NEXT, SHANGHAI, flow_events, ingest, local, sale, step_event


def dirty(engine: Engine) -> set[tuple[str, date]]:
    with session_scope(engine) as session:
        return {(s, d) for s, d in session.execute(select(RollupDirty.store_id, RollupDirty.day))}


def rolled_up(engine: Engine, store_id: str, day: date) -> RollupStoreDay:
    with session_scope(engine) as session:
        row = session.get(RollupStoreDay, (store_id, day))
        assert row is not None
        return row


def recomputed(engine: Engine, store_id: str, day: date) -> rollups.DayValues:
    with session_scope(engine) as session:
        store = session.get(Store, store_id)
        assert store is not None
        return rollups.compute(session, [store], [day])[(store_id, day)]


def as_values(row: RollupStoreDay) -> tuple[Any, ...]:
    ratios = tuple(
        (n, getattr(row, f"{n}_num"), getattr(row, f"{n}_den")) for n in sorted(rollups.RATIOS)
    )  # same shape as DayValues.figures()
    return (Decimal(str(row.sales)).quantize(Decimal("0.01")), row.transactions, row.returns, row.visitors, ratios)


AFTER = datetime(2026, 11, 25, 2, tzinfo=UTC)  # a week after DAY: DAY and NEXT are closed days


def test_marking_again_bumps_the_generation_so_a_running_refresh_keeps_the_mark(chain: Engine) -> None:
    def generation() -> int:
        with session_scope(chain) as session:
            return int(session.scalar(select(RollupDirty.generation).where(RollupDirty.day == DAY)) or 0)

    ingest(chain, [sale("R1", local(DAY, 10))])
    assert generation() == 1
    ingest(chain, [sale("R2", local(DAY, 23, 59))])
    assert generation() == 2


def test_a_refresh_racing_late_inserts_leaves_the_rollup_equal_to_a_fresh_recomputation(
    pg_chain: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real parallel connections: the late receipt commits after the refresh computed, before it clears its marks."""
    ingest(pg_chain, [sale(f"R{n}", local(DAY, 10, n), amount="10.00") for n in range(3)])
    computed, late_committed = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    original_store = rollups.store

    def store_then_wait(*args: Any, **kwargs: Any) -> int:
        written = original_store(*args, **kwargs)
        computed.wait()  # the figures of DAY are computed, the marks not yet cleared
        late_committed.wait()
        return written

    monkeypatch.setattr(rollups, "store", store_then_wait)
    errors: list[BaseException] = []

    def refresher() -> None:
        try:
            with session_scope(pg_chain) as session:
                rollups.refresh(session=session, now=AFTER)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=refresher)
    thread.start()
    computed.wait()
    ingest(pg_chain, [sale("LATE", local(DAY, 23, 58), amount="99.00")])  # a till catching up after midnight
    late_committed.wait()
    thread.join(timeout=30)
    assert not errors and not thread.is_alive()
    monkeypatch.setattr(rollups, "store", original_store)

    # The late receipt is not in the rollup yet, so its store-day must still be dirty ...
    assert ("S001", DAY) in dirty(pg_chain)
    with session_scope(pg_chain) as session:
        stores = list(session.scalars(select(Store).where(Store.store_id == "S001")))
        fresh = rollups.store_day_values(session=session, stores=stores, days=[DAY])[("S001", DAY)]
        assert (fresh.sales, fresh.transactions) == (Decimal("129.00"), 4)  # readers compute it fresh meanwhile
        rollups.refresh(session=session, now=AFTER)
    # ... and the next refresh rolls it up: the rollup equals a fresh recomputation.
    assert dirty(pg_chain) == set()
    row = rolled_up(pg_chain, "S001", DAY)
    assert (row.sales, row.transactions) == (Decimal("129.00"), 4)
    assert as_values(row) == recomputed(pg_chain, "S001", DAY).figures()


def test_a_step_after_midnight_marks_the_consultations_day(chain: Engine) -> None:
    ingest(
        chain, flow_events("C1", local(DAY, 22), insurance="pass") + flow_events("C2", local(DAY, 23), insurance="pass")
    )
    with session_scope(chain) as session:
        rollups.refresh(session=session, now=AFTER)
    assert dirty(chain) == set()
    assert (
        rolled_up(chain, "S001", DAY).insurance_pass_rate_num,
        rolled_up(chain, "S001", DAY).insurance_pass_rate_den,
    ) == (2, 2)

    # The insurance platform's answer comes back after midnight: C2's check failed after all.
    ingest(
        chain, [step_event("C2", "insurance_check", local(NEXT, 0, 20), data={"result": "fail", "reason": "卡已过期"})]
    )
    assert dirty(chain) == {("S001", DAY), ("S001", NEXT)}
    with session_scope(chain) as session:
        assert insurance_pass_rate(session=session, store_id="S001", day=DAY).numerator == 1
        rollups.refresh(session=session, now=AFTER)
    row = rolled_up(chain, "S001", DAY)
    assert (row.insurance_pass_rate_num, row.insurance_pass_rate_den) == (1, 2)
    assert as_values(row) == recomputed(chain, "S001", DAY).figures()


def test_a_consultation_id_reused_weeks_later_marks_only_its_own_days(chain: Engine) -> None:
    month_ago = DAY - timedelta(days=30)
    ingest(chain, flow_events("C1", local(month_ago, 10)))
    with session_scope(chain) as session:
        rollups.refresh(session=session, now=AFTER)
    ingest(chain, [step_event("C1", "symptoms", local(DAY, 10))])
    assert dirty(chain) == {("S001", DAY)}


def test_past_days_do_not_starve_behind_more_than_a_batch_of_open_days(chain: Engine) -> None:
    """A refresh batch of 2 with 3 stores marked today (older marks) and one closed day marked later."""
    now = AFTER
    today = now.astimezone(SHANGHAI).date()
    ingest(
        chain, [sale(f"T{n}", now - timedelta(minutes=1), store_id=s) for n, s in enumerate(("S001", "S002", "S003"))]
    )
    ingest(chain, [sale("OLD", local(DAY, 12), store_id="S002")])
    assert dirty(chain) == {("S001", today), ("S002", today), ("S003", today), ("S002", DAY)}
    with session_scope(chain) as session:
        assert rollups.refresh(session=session, limit=2, now=now) == 1
    assert dirty(chain) == {("S001", today), ("S002", today), ("S003", today)}
    assert rolled_up(chain, "S002", DAY).transactions == 1


def test_a_closed_day_changed_by_late_data_is_marked_revised_with_when(chain: Engine) -> None:
    ingest(chain, [sale("R1", local(DAY, 10), amount="20.00")])
    with session_scope(chain) as session:
        rollups.refresh(session=session, now=AFTER)
        rollups.refresh(session=session, now=AFTER)
    assert rolled_up(chain, "S001", DAY).revised_at is None  # first figures: nothing revised

    # A store-day recomputed with the same figures (a duplicate re-sent) is not a revision.
    with session_scope(chain) as session:
        rollups.rebuild(session=session, first=DAY, last=DAY, store_ids=["S001"])
    assert rolled_up(chain, "S001", DAY).revised_at is None

    ingest(chain, [sale("LATE", local(DAY, 21), amount="5.00")])
    with session_scope(chain) as session:
        stores = list(session.scalars(select(Store).where(Store.store_id == "S001")))
        before_refresh = rollups.store_day_values(session=session, stores=stores, days=[DAY])[("S001", DAY)]
        assert before_refresh.sales == Decimal("25.00") and before_refresh.revised_at is not None
    revised_run = AFTER + timedelta(hours=1)
    with session_scope(chain) as session:
        rollups.refresh(session=session, now=revised_run)
    row = rolled_up(chain, "S001", DAY)
    assert row.sales == Decimal("25.00") and row.revised_at == revised_run
    with session_scope(chain) as session:
        stores = list(session.scalars(select(Store).where(Store.store_id == "S001")))
        values = rollups.store_day_values(session=session, stores=stores, days=[DAY])[("S001", DAY)]
        assert values.revised_at == revised_run


def count(engine: Engine, model: Any) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_events_hooks_and_dead_letters_commit_together_or_not_at_all(chain: Engine) -> None:
    """A hook failing (its table gone) rolls back the batch: no event without its rollup, no stray dead letter.

    On SQLite this needs SQLAlchemy's pysqlite transaction recipe: in pysqlite's legacy mode the
    events committed at the writer's RELEASE SAVEPOINT, before the hooks ran.
    """
    good, bad = sale("R1", local(DAY, 10)), {**sale("R2", local(DAY, 11)), "store_id": "S999"}
    with chain.begin() as conn:
        conn.execute(text("SELECT count(*) FROM rollup_store_hour"))  # SQLite: load the current schema first
        conn.execute(text("ALTER TABLE rollup_store_hour RENAME TO rollup_store_hour_away"))
    try:
        with pytest.raises(Exception, match="rollup_store_hour"), session_scope(chain) as session:
            ingest_payloads([good, bad], session=session, source="test")
        assert (count(chain, Receipt), count(chain, RollupDirty), count(chain, DeadLetter)) == (0, 0, 0)
    finally:
        with chain.begin() as conn:
            conn.execute(text("SELECT count(*) FROM rollup_store_hour_away"))
            conn.execute(text("ALTER TABLE rollup_store_hour_away RENAME TO rollup_store_hour"))

    # The retry after repair stores everything once: nothing is a duplicate of a half-committed try.
    with session_scope(chain) as session:
        results = ingest_payloads([good, bad], session=session, source="test")
    assert [r.status for r in results] == ["accepted", "rejected"]
    assert (
        count(chain, Receipt),
        count(chain, RollupDirty),
        count(chain, RollupStoreHour),
        count(chain, DeadLetter),
    ) == (1, 1, 1, 1)


def test_every_ingest_path_runs_the_hooks_without_installing_anything(chain: Engine) -> None:
    """No install() call anywhere: storing an event through the ingest service marks its store-day."""
    from ingest.hooks import accepted_event_handlers

    assert [h.__name__ for h in accepted_event_handlers()] == ["mark_dirty", "check_accepted_events"]
    ingest(chain, [sale("R1", local(DAY, 10))])
    assert dirty(chain) == {("S001", DAY)}
