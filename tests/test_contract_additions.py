"""Receipts as real tills send them: discounts, rewards, tax, tenders, cash rounding, the source's ids.

Each test runs on SQLite and on TimescaleDB: the stored columns, the day's sales in the metrics
and the rollups, and the live store figures all read net sales, tax-inclusive by default and
tax-exclusive with `STOREPULSE_SALES_INCLUDE_TAX=false`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from dashboard.store_today import chain_today, store_today
from ingest.db import session_scope
from ingest.models import DeadLetter, Receipt, ReceiptLine, RollupStoreDay, RollupStoreHour, RollupStoreSkuDay, Store
from ingest.service import ingest_payloads
from ingest.settings import get_settings
from store_rules import rollups
from store_rules.metrics import average_ticket
from tests.factories import discounted_return, till_receipt
from tests.test_metrics import PLAIN, SHANGHAI, ingest, local, sale

DAY = datetime(2019, 6, 12).date()
SKU_A = "6901234567890"
SKU_B = "6909876543210"


def tax_inclusive_sale(receipt_id: str, at: datetime) -> dict[str, Any]:
    """A Chinese till's sale: prices hold their tax (the chain default, not said), 20.00 of which 1.15 tax."""
    payload = sale(receipt_id, at, skus=(SKU_A,), amount="20.00")
    return {**payload, "tax": "1.15", "tenders": [{"type": "wechat", "amount": "20.00"}]}


@pytest.fixture
def sales_without_tax(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("STOREPULSE_SALES_INCLUDE_TAX", "false")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def stored(engine: Engine, receipt_id: str) -> tuple[Receipt, list[ReceiptLine]]:
    with session_scope(engine) as session:
        receipt = session.scalars(select(Receipt).where(Receipt.receipt_id == receipt_id)).one()
        lines = list(
            session.scalars(
                select(ReceiptLine).where(ReceiptLine.event_id == receipt.event_id).order_by(ReceiptLine.line_no)
            )
        )
        session.expunge_all()
        return receipt, lines


def money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"))


def test_a_till_receipt_is_stored_with_its_discounts_tax_tenders_rounding_and_source(chain: Engine) -> None:
    ingest(chain, [till_receipt("R1", local(DAY, 10))])
    receipt, lines = stored(chain, "R1")
    assert money(receipt.total) == Decimal("22.70")
    assert money(receipt.net_total) == Decimal("21.50")
    assert money(receipt.discount_total) == Decimal("4.00")  # line 2.00 + 0.50, receipt 1.00 + 0.50
    assert money(receipt.tax_total) == Decimal("1.29")
    assert receipt.prices_include_tax is False
    assert receipt.tenders == [{"type": "cash", "amount": "50.00"}, {"type": "cash", "amount": "-27.30"}]
    assert receipt.source_name == "poslog:ncr_acs"
    assert receipt.raw["source"]["workstation"] == "3"  # the source's other ids stay in the raw payload
    assert [(line.line_no, money(line.amount), money(line.discount)) for line in lines] == [
        (1, Decimal("20.00"), Decimal("2.00")),
        (2, Decimal("5.50"), Decimal("0.50")),
    ]


def test_a_v1_receipt_means_what_it_meant(chain: Engine) -> None:
    ingest(chain, [sale("V1", local(DAY, 9), amount="12.30")])
    receipt, lines = stored(chain, "V1")
    assert (money(receipt.total), money(receipt.net_total), money(receipt.discount_total)) == (
        Decimal("12.30"),
        Decimal("12.30"),
        Decimal("0.00"),
    )
    assert (receipt.tax_total, receipt.prices_include_tax, receipt.tenders, receipt.source_name) == (
        None,
        None,
        None,
        None,
    )
    assert [money(line.discount) for line in lines] == [Decimal("0.00")]
    # A receipt stored before net sales existed (no net_total) still reports its total.
    with session_scope(chain) as session:
        session.execute(update(Receipt).where(Receipt.receipt_id == "V1").values(net_total=None))
        stores = list(session.scalars(select(Store).where(Store.store_id == "S001")))
        assert rollups.compute(session, stores, [DAY])[("S001", DAY)].sales == Decimal("12.30")
    # A plain-text `source` (sent before `source` was part of the contract) is still accepted: its name.
    ingest(chain, [{**sale("V3", local(DAY, 9)), "source": "uci-online-retail"}])
    assert stored(chain, "V3")[0].source_name == "uci-online-retail"
    # The v1 rule and its message are unchanged.
    with session_scope(chain) as session:
        [result] = ingest_payloads([{**sale("V2", local(DAY, 9)), "total": "9.99"}], session=session, source="test")
    assert (result.status, result.error) == ("rejected", "total: 9.99 is not the sum of line amounts (10.00)")


def test_day_sales_are_net_sales_with_tax_in_metrics_rollups_and_hours(chain: Engine) -> None:
    ingest(
        chain,
        [
            till_receipt("R1", local(DAY, 10, 5)),  # 21.50 net + 1.29 tax added to prices = 22.79
            sale("V1", local(DAY, 10, 30), amount="10.00"),  # 10.00
            tax_inclusive_sale("T1", local(DAY, 11)),  # 20.00, its 1.15 tax already inside
            discounted_return("X1", local(DAY, 11, 30)),  # -17.00, its -0.96 tax inside
        ],
    )
    with session_scope(chain) as session:
        ticket = average_ticket(session=session, store_id="S001", day=DAY)
        assert (ticket.numerator, ticket.denominator, ticket.ratio) == (Decimal("35.79"), 3, Decimal("11.93"))
        hours = {
            row.hour_start.astimezone(SHANGHAI).hour: money(row.sales)
            for row in session.scalars(select(RollupStoreHour).where(RollupStoreHour.store_id == "S001"))
        }
        assert hours == {10: Decimal("32.79"), 11: Decimal("3.00")}  # added to at ingest
        assert rollups.refresh(session=session, now=datetime(2019, 6, 14, tzinfo=UTC)) == 1
    with session_scope(chain) as session:
        day_row = session.get(RollupStoreDay, ("S001", DAY))
        assert day_row is not None and (money(day_row.sales), day_row.transactions, day_row.returns) == (
            Decimal("35.79"),
            3,
            1,
        )
        rewritten = {
            row.hour_start.astimezone(SHANGHAI).hour: money(row.sales)
            for row in session.scalars(select(RollupStoreHour).where(RollupStoreHour.store_id == "S001"))
        }
        assert rewritten == hours  # the day's rewrite from the stored receipts agrees with the ingest hook
        # SKU-day sales are line amounts less the line's own discounts (sale lines only).
        skus = {
            row.sku: (money(row.sales), row.units)
            for row in session.scalars(select(RollupStoreSkuDay).where(RollupStoreSkuDay.day == DAY))
        }
        assert skus == {
            SKU_A: (Decimal("38.00"), Decimal(3)),  # R1's 20.00 - 2.00 and T1's 20.00
            SKU_B: (Decimal("5.00"), Decimal(1)),
            PLAIN: (Decimal("10.00"), Decimal(1)),
        }


def test_tax_exclusive_sales_take_the_tax_out_wherever_prices_held_it(chain: Engine, sales_without_tax: None) -> None:
    ingest(
        chain,
        [
            till_receipt("R1", local(DAY, 10, 5)),  # 21.50: prices had no tax
            sale("V1", local(DAY, 10, 30), amount="10.00"),  # 10.00: tax unknown, none taken out
            tax_inclusive_sale("T1", local(DAY, 11)),  # 20.00 - 1.15 = 18.85
            discounted_return("X1", local(DAY, 11, 30)),  # -17.00 - (-0.96) = -16.04
        ],
    )
    with session_scope(chain) as session:
        ticket = average_ticket(session=session, store_id="S001", day=DAY)
        assert (ticket.numerator, ticket.ratio) == (Decimal("34.31"), Decimal("11.44"))
        hours = {
            row.hour_start.astimezone(SHANGHAI).hour: money(row.sales)
            for row in session.scalars(select(RollupStoreHour).where(RollupStoreHour.store_id == "S001"))
        }
        assert hours == {10: Decimal("31.50"), 11: Decimal("2.81")}
        rollups.refresh(session=session, now=datetime(2019, 6, 14, tzinfo=UTC))
    with session_scope(chain) as session:
        day_row = session.get(RollupStoreDay, ("S001", DAY))
        assert day_row is not None and money(day_row.sales) == Decimal("34.31")


def test_prices_without_tax_can_be_the_chain_default(
    chain: Engine, monkeypatch: pytest.MonkeyPatch, sales_without_tax: None
) -> None:
    monkeypatch.setenv("STOREPULSE_PRICES_INCLUDE_TAX", "false")
    get_settings.cache_clear()
    # The receipt does not say: the chain default (prices without tax) makes its total net + tax.
    payload = till_receipt("R1", local(DAY, 10))
    del payload["prices_include_tax"]
    ingest(chain, [payload])
    receipt, _ = stored(chain, "R1")
    assert receipt.prices_include_tax is None  # stored as "the chain's default"
    with session_scope(chain) as session:
        assert average_ticket(session=session, store_id="S001", day=DAY).numerator == Decimal("21.50")


def test_live_store_figures_show_net_sales(chain: Engine) -> None:
    now = datetime.now(UTC)
    ingest(chain, [till_receipt("R1", now - timedelta(minutes=1)), discounted_return("X1", now - timedelta(minutes=1))])
    with session_scope(chain) as session:
        page = store_today(session=session, store_id="S001", now=now)
        chain_figures = chain_today(session=session, now=now)
        assert page is not None
        assert (page.figures.sales, page.figures.transactions, page.figures.returns) == (Decimal("5.79"), 1, 1)
        assert chain_figures.figures.sales == Decimal("5.79")  # 22.79 - 17.00


def rejected(engine: Engine, payload: dict[str, Any]) -> str:
    with session_scope(engine) as session:
        [result] = ingest_payloads([payload], session=session, source="test")
    assert result.status == "rejected"
    with session_scope(engine) as session:  # kept as a dead letter, not dropped
        assert session.scalar(
            select(func.count()).select_from(DeadLetter).where(DeadLetter.event_id == payload["event_id"])
        )
    return result.error or ""


def test_totals_that_do_not_reconcile_are_refused_with_the_expected_figure(chain: Engine) -> None:
    at = local(DAY, 10)
    assert rejected(chain, till_receipt("B1", at, total="22.79")) == (
        "total: 22.79 does not reconcile; expected 22.70 = net sales 21.50 (line amounts 25.50 - discounts 4.00)"
        " + tax added to prices 1.29 + rounding -0.09"
    )
    too_much = till_receipt("B3", at, discounts=[{"kind": "coupon", "amount": "30.00"}], total="0.00")
    assert rejected(chain, too_much) == "discounts: the discounts (32.50) exceed the line amounts (25.50)"
    # The same receipt priced tax-inclusive: its tax is already in the prices.
    assert rejected(chain, till_receipt("B2", at, prices_include_tax=True)).startswith(
        "total: 22.70 does not reconcile; expected 21.41 = net sales 21.50"
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {
                "lines": [
                    {
                        "line_no": 1,
                        "sku": SKU_A,
                        "qty": "-1",
                        "unit_price": "20.00",
                        "amount": "-20.00",
                        "discount": "2.00",
                    }
                ]
            },
            "lines[0]: discount: 2.00 must have the sign of the line amount (-20.00) and be no larger than it",
        ),
        (
            {"discounts": [{"kind": "coupon", "amount": "1.00"}]},
            "discounts[0].amount: 1.00 must be 0 or negative on a return",
        ),
        ({"tax": "0.96"}, "tax: 0.96 must be 0 or negative on a return"),
        (
            {"discounts": [{"kind": "gift", "amount": "-1.00"}]},
            "discounts[0].kind: Input should be 'discount', 'reward' or 'coupon'",
        ),
        (
            {"tenders": [{"type": "cash", "amount": "-17.001"}]},
            "tenders[0].amount: amount '-17.001' has more than 2 decimals",
        ),
        ({"source": {"store": "9"}}, "source.name: required"),
        ({"source": {"name": "poslog", "store": 9}}, "source: 'store' must be text of at most 64 characters"),
        ({"rounding": "x"}, "rounding: amount 'x' is not a decimal number"),
        ({"source": 9}, 'source: must be an object with a name, e.g. {"name": "poslog"}'),
    ],
)
def test_a_return_keeps_its_signs_and_bad_additions_name_their_field(
    chain: Engine, change: dict[str, Any], error: str
) -> None:
    assert rejected(chain, {**discounted_return("X9", local(DAY, 12)), **change}) == error


def test_a_return_with_discounts_is_stored_negative(chain: Engine) -> None:
    ingest(chain, [discounted_return("X1", local(DAY, 12))])
    receipt, lines = stored(chain, "X1")
    assert (
        money(receipt.total),
        money(receipt.net_total),
        money(receipt.discount_total),
        money(receipt.tax_total),
    ) == (
        Decimal("-17.00"),
        Decimal("-17.00"),
        Decimal("-3.00"),
        Decimal("-0.96"),
    )
    assert receipt.tenders == [{"type": "refund", "amount": "-17.00"}]
    assert [(money(line.amount), money(line.discount)) for line in lines] == [(Decimal("-20.00"), Decimal("-2.00"))]
