"""Reported sales: what one receipt adds to "sales" on every page, metric, rule and rollup.

A receipt's net sales are its line amounts less every line and receipt discount, as priced. The
chain reports them tax-inclusive or tax-exclusive (`Settings.sales_include_tax`); whether a
receipt's prices already hold its tax is the receipt's own `prices_include_tax`, or the chain's
default when it did not say. This module is the one place that turns those into a figure, in
Python (a receipt being ingested) and in SQL (receipts already stored), so the two never differ.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import ColumnElement, case, func, or_

from ingest.contract import ReceiptEvent
from ingest.models import Receipt, ReceiptLine
from ingest.settings import Settings, get_settings

ZERO = Decimal(0)


def reported_sales(
    net: Decimal, tax: Decimal | None, prices_include_tax: bool | None, *, settings: Settings | None = None
) -> Decimal:
    """Net sales with or without tax, as the chain reports them; unknown tax counts as none."""
    settings = settings or get_settings()
    prices_hold_tax = settings.prices_include_tax if prices_include_tax is None else prices_include_tax
    tax = tax or ZERO
    if settings.sales_include_tax:
        return net if prices_hold_tax else net + tax
    return net - tax if prices_hold_tax else net


def event_sales(event: ReceiptEvent, *, settings: Settings | None = None) -> Decimal:
    """Reported sales of a receipt being ingested."""
    return reported_sales(event.net_sales, event.tax, event.prices_include_tax, settings=settings)


def _prices_hold_tax(chain_default: bool) -> ColumnElement[bool]:
    column = Receipt.prices_include_tax
    if chain_default:
        return or_(column.is_(None), column.is_(True))
    return column.is_(True)


def receipt_sales_sql(*, settings: Settings | None = None) -> ColumnElement[Decimal]:
    """`reported_sales` of a `receipts` row as a SQL expression (sum it, group it, compare it).

    A receipt stored before net sales existed has them as its total (the migration backfills
    net_total; the COALESCE covers rows written by hand without it).
    """
    settings = settings or get_settings()
    net = func.coalesce(Receipt.net_total, Receipt.total)
    tax = func.coalesce(Receipt.tax_total, 0)
    holds_tax = _prices_hold_tax(settings.prices_include_tax)
    if settings.sales_include_tax:
        return net + case((holds_tax, 0), else_=tax)
    return net - case((holds_tax, tax), else_=0)


def line_net_sql() -> ColumnElement[Decimal]:
    """A receipt line's net amount (amount less its own discounts), as priced."""
    return ReceiptLine.amount - ReceiptLine.discount
