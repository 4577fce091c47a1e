"""Rollups stay equal to the services: marked dirty by ingest, refreshed, read fresh even before a refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, delete, func, select

from ingest.db import session_scope
from ingest.models import RollupDirty, RollupStoreDay, RollupStoreSkuDay, Store
from store_rules import rollups
from store_rules.metrics import day_metrics
from tests.test_alerts import D1, D2, D3, insurance_day
from tests.test_metrics import SHANGHAI, footfall, ingest, local, sale


def dirty(engine: Engine) -> set[tuple[str, object]]:
    with session_scope(engine) as session:
        return {(store_id, day) for store_id, day in session.execute(select(RollupDirty.store_id, RollupDirty.day))}


def test_ingest_marks_refresh_recomputes_and_readers_never_see_a_stale_day(chain: Engine) -> None:
    ingest(chain, insurance_day(D3, 7, 3) + [sale(f"R{n}", local(D3, 10, n), amount="12.00") for n in range(4)])
    ingest(chain, [footfall(1, local(D3, 10), 25)])
    assert dirty(chain) == {("S001", D3)}
    with session_scope(chain) as session:
        assert rollups.refresh(session=session) == 1
    assert dirty(chain) == set()
    with session_scope(chain) as session:
        row = session.get(RollupStoreDay, ("S001", D3))
        metrics = day_metrics(session=session, store_id="S001", day=D3)
        assert row is not None
        assert (row.sales, row.transactions, row.visitors) == (Decimal("48.00"), 4, 25)
        assert (row.insurance_pass_rate_num, row.insurance_pass_rate_den) == (7, 10)
        for name in rollups.RATIOS:
            ratio = getattr(metrics, name)
            assert (getattr(row, f"{name}_num"), getattr(row, f"{name}_den")) == (ratio.numerator, ratio.denominator)
        sku = session.scalars(select(RollupStoreSkuDay)).one()
        assert (sku.store_id, sku.lines, sku.units) == ("S001", 4, Decimal(4))

    # A late sale for D3 (an offline till catching up): read fresh at once, rolled up at the next refresh.
    ingest(chain, [sale("LATE", local(D3, 21), amount="100.00")])
    assert dirty(chain) == {("S001", D3)}
    with session_scope(chain) as session:
        stores = list(session.scalars(select(Store).where(Store.store_id == "S001")))
        fresh = rollups.store_day_values(session=session, stores=stores, days=[D3])[("S001", D3)]
        assert (fresh.sales, fresh.transactions) == (Decimal("148.00"), 5)
        assert session.get(RollupStoreDay, ("S001", D3)).transactions == 4  # type: ignore[union-attr]
        rollups.refresh(session=session)
    with session_scope(chain) as session:
        assert session.get(RollupStoreDay, ("S001", D3)).transactions == 5  # type: ignore[union-attr]


def test_today_stays_marked_and_rebuild_fills_quiet_days(chain: Engine) -> None:
    now = datetime.now(UTC)
    today = now.astimezone(SHANGHAI).date()
    ingest(chain, [sale("NOW", now - timedelta(minutes=5))])
    with session_scope(chain) as session:
        assert rollups.refresh(session=session, now=now) == 0  # today changes all day: read raw
    assert dirty(chain) == {("S001", today)}
    with session_scope(chain) as session:
        assert rollups.rebuild(session=session, first=D1, last=D2) == 6  # 3 stores × 2 days, events or not
        assert session.scalar(select(func.count()).select_from(RollupStoreDay)) == 6
        quiet = session.get(RollupStoreDay, ("S003", D1))
        assert quiet is not None and (quiet.transactions, quiet.traceability_den) == (0, 0)


def test_the_hour_rollup_counts_each_accepted_event_once_and_rebuild_rewrites_it(chain: Engine) -> None:
    from ingest.models import RollupStoreHour

    events = [sale(f"H{n}", local(D3, 10, n), amount="10.00") for n in range(3)] + [
        sale("H9", local(D3, 11, 5), amount="7.50"),
        footfall(1, local(D3, 10), 12),
        footfall(2, local(D3, 11), 8),
    ]
    ingest(chain, events)
    with session_scope(chain) as session:  # the same events again: duplicates, nothing added
        from ingest.service import ingest_payloads

        assert {r.status for r in ingest_payloads(events, session=session, source="test")} == {"duplicate"}

    def hours() -> dict[int, tuple[Decimal, int, int]]:
        with session_scope(chain) as session:
            rows = session.scalars(select(RollupStoreHour).where(RollupStoreHour.store_id == "S001"))
            return {r.hour_start.astimezone(SHANGHAI).hour: (Decimal(str(r.sales)), r.transactions, r.visitors)
                    for r in rows}  # fmt: skip

    expected = {10: (Decimal("30.00"), 3, 12), 11: (Decimal("7.50"), 1, 8)}
    assert hours() == expected
    with session_scope(chain) as session:
        session.execute(delete(RollupStoreHour))
    with session_scope(chain) as session:
        rollups.rebuild(session=session, first=D3, last=D3)
    assert hours() == expected


def test_today_by_hour_reads_closed_hours_from_the_rollup_and_equals_the_raw_events(chain: Engine) -> None:
    from dashboard.store_today import store_today

    now = local(D3, 14, 30)  # a fixed clock: 13:00–14:00 is closed (from the rollup), 14:00– is read raw
    earlier = now - timedelta(hours=1)
    ingest(chain, [sale("E1", earlier, amount="20.00"), sale("E2", now - timedelta(seconds=30), amount="5.00")])
    ingest(chain, [footfall(3, local(D3, 13), 9)])
    with session_scope(chain) as session:
        today = store_today(session=session, store_id="S001", now=now)
        assert today is not None
        assert (today.figures.sales, today.figures.transactions, today.figures.visitors) == (Decimal("25.00"), 2, 9)
        assert {h.hour: h.transactions for h in today.hours if h.transactions} == {13: 1, 14: 1}
