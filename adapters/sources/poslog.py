"""ARTS POSLog (NCR ACS 2.x, Retalix, roqqio/Futura, Visma 6.0) as contract v1 `receipt` events.

The format rules and each dialect's quirks are in ../shared/INTEGRATIONS.md (ARTS POSLog section)
and docs/poslog.md; the comments below name the rule each branch follows. In short:

- Only `RetailTransaction`s become receipts; `ControlTransaction`s (sign-on, no-sale, ...) are
  counted in the report. A Visma transaction carries a retail transaction *and* a cash-drawer
  control record: it is a retail transaction.
- `TransactionStatus` Finished, Totaled and Resumed are sales; Canceled, Voided, Suspended,
  SuspendedDeleted and SuspendedRetrieved are not; a PostVoided transaction (or a control
  transaction's post-void) cancels the transaction its `TransactionLink` names. Training-mode
  transactions are left out. Everything left out is in the report with its element path.
- Lines are `Sale` and `Return` items. NCR's void reversal (a second line with `VoidFlag` and a
  negative quantity and amount) is netted into the line it reverses. A return is either a
  `Return` item or roqqio's `Sale` with quantity −1, `SalesMode` RETOUR and a positive amount;
  both become lines with a negative quantity and amount.
- `RetailPriceModifier` → the line's `discount`; `Discount` items → receipt `discounts`;
  monetary loyalty rewards → receipt `discounts` of kind `reward` (NCR's summary row, which
  repeats its detail rows, is counted once); tax lines → `tax`, and
  `TaxIncludedInTaxableAmountFlag` (or, without it, the grand total) → `prices_include_tax`;
  tenders, change (negative cash) and refunds (negative) → `tenders`; cash rounding → `rounding`.
- Amounts with 3 or 5 decimals are rounded to cents, half up, and counted in the report.
- Times without an offset are the store's wall clock (`AdapterContext.zone`).

An adapter never touches the database: mappings and zones come in through `AdapterContext`.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from adapters.sources.base import (
    CENT,
    MAX_LINES,
    AdapterContext,
    Conversion,
    ImportReport,
    SourceAdapter,
    cents,
    natural_id,
    register_adapter,
)

SOURCE = "poslog"
IXRETAIL = "http://www.nrf-arts.org/IXRetail/namespace/"
# Which vendor wrote a file, told by the extension namespaces it declares (INTEGRATIONS.md table).
DIALECT_BY_NAMESPACE = {
    "http://www.ncr.com/rsd/acs/tlog/markup/poslog/2.1": "ncr_acs",
    "http://www.Retalix.com/Extensions": "retalix",
    "http://www.futura4retail.com/pos/namespace/": "roqqio",
    "http://schemas.vismaretail.com/poslog/": "visma",
}
SALE_STATUSES = frozenset({"Finished", "Totaled", "Resumed"})
NO_SALE_STATUSES = {
    "Canceled": "cancelled before tender: no sale",
    "Cancelled": "cancelled before tender: no sale",
    "Voided": "voided inside the transaction: no sale",
    "Suspended": "suspended: no sale (the transaction that resumes it is the sale)",
    "SuspendedDeleted": "suspended and deleted: no sale",
    "SuspendedRetrieved": "suspended, then retrieved by another transaction, which is the sale",
}
TENDER_TYPES = {
    "Cash": "cash",
    "CreditDebit": "card",
    "Check": "check",
    "Voucher": "voucher",
    "GiftCertificate": "voucher",
    "GiftCard": "giftcard",
    "Coupon": "coupon",
    "StoreCredit": "storecredit",
}
# (store, workstation, business day, sequence): what a TransactionLink names.
LinkKey = tuple[str | None, str | None, str | None, str | None]
ZERO = Decimal(0)
QTY_PLACES = Decimal("0.001")


class PoslogFormatError(ValueError):
    """The file is not a POSLog document this adapter can read (named with file:line:column)."""


@functools.lru_cache(maxsize=4096)
def _local(tag: str) -> str:
    # Called for every child of every line item (~160,000 times per MB of NCR log) on a few
    # dozen distinct tags: the cache halves its cost.
    return tag.rpartition("}")[2]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _plain(number: Decimal) -> str:
    """A decimal as plain text without trailing zeros (1.0000 → 1, 2.500 → 2.5)."""
    text = format(number.normalize(), "f")
    return "0" if text in ("-0", "0") else text


@dataclass
class _Money:
    """Counts amounts read with more than 2 decimals (3 in roqqio, 5 in Visma) and those rounding changed."""

    long_decimals: int = 0
    changed: int = 0

    def read(self, text: str | None) -> Decimal | None:
        if text is None or not text.strip():
            return None
        try:
            value = Decimal(text.strip())
        except InvalidOperation:
            return None
        if not value.is_finite():
            return None
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            self.long_decimals += 1
            if cents(value) != value:
                self.changed += 1
        return cents(value)


@dataclass
class _Line:
    line_no: int | None
    item_id: str | None
    gtin: str | None
    qty: Decimal
    unit_price: Decimal
    amount: Decimal
    discount: Decimal
    is_return: bool
    void: bool
    description: str | None
    item_type: str | None


@dataclass
class _Reward:
    key: tuple[str, str]
    amount: Decimal  # as the source signs it: negative is money off
    detailed: bool
    summarized: bool
    reason: str | None


@dataclass
class _Transaction:
    """One `Transaction` element, read without StorePulse ids (mapping comes later)."""

    where: str
    kind: str  # retail / control / other
    store: str | None
    workstation: str | None
    sequence: str | None
    business_day: str | None
    operator: str | None
    transaction_id: str | None
    status: str
    training: bool
    times: dict[str, str]
    lines: list[_Line] = field(default_factory=list)
    discounts: list[dict[str, Any]] = field(default_factory=list)
    tax: Decimal | None = None
    prices_include_tax: bool | None = None
    tenders: list[dict[str, Any]] = field(default_factory=list)
    rounding: Decimal = ZERO
    grand_total: Decimal | None = None
    source_net: Decimal | None = None
    source_tax: Decimal | None = None
    links: list[tuple[str, LinkKey]] = field(default_factory=list)
    post_void: bool = False
    notes: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    money: _Money = field(default_factory=_Money)

    @property
    def link_key(self) -> LinkKey:
        return (self.store, self.workstation, self.business_day, self.sequence)

    @property
    def label(self) -> str:
        return (
            f"{self.where} (store {self.store}, workstation {self.workstation}, "
            f"day {self.business_day}, sequence {self.sequence})"
        )


class _Reader:
    """Reads one `Transaction` element of a POSLog document in its IXRetail namespace."""

    def __init__(self, namespace: str, dialect: str) -> None:
        self.ns = f"{{{namespace}}}" if namespace else ""
        self.dialect = dialect
        self._qualified: dict[str, str] = {}

    def q(self, path: str) -> str:
        qualified = self._qualified.get(path)
        if qualified is None:
            qualified = self._qualified[path] = "/".join(self.ns + part for part in path.split("/"))
        return qualified

    def text(self, element: ET.Element, path: str) -> str | None:
        found = element.find(self.q(path))
        if found is None or found.text is None:
            return None
        return found.text.strip() or None

    def extension(self, element: ET.Element, name: str) -> ET.Element | None:
        """A vendor extension child (acs:, fu:, r10Ex:, ...) by local name, whatever its namespace."""
        for child in element:
            if _local(child.tag) == name and not child.tag.startswith(self.ns or "\0"):
                return child
        return None

    def extension_text(self, element: ET.Element, name: str) -> str | None:
        found = self.extension(element, name)
        return found.text.strip() if found is not None and found.text and found.text.strip() else None

    def transaction(self, element: ET.Element, where: str) -> _Transaction:
        retail = element.find(self.q("RetailTransaction"))
        control = element.find(self.q("ControlTransaction"))
        business_day = self.text(element, "BusinessDayDate") or self.text(element, "BusinessDayDate/Date")
        times = {
            name: value
            for name, value in (
                ("EndDateTime", self.text(element, "EndDateTime")),
                ("ReceiptDateTime", self.text(element, "ReceiptDateTime")),
                ("BeginDateTime", self.text(element, "BeginDateTime")),
                ("POSLogDateTime", self.text(element, "POSLogDateTime")),
            )
            if value
        }
        if retail is not None and "ReceiptDateTime" not in times:
            # NCR ACS keeps the receipt time inside the retail transaction.
            receipt_time = self.text(retail, "ReceiptDateTime")
            if receipt_time:
                times["ReceiptDateTime"] = receipt_time
        txn = _Transaction(
            where=where,
            kind="retail" if retail is not None else "control" if control is not None else "other",
            # v2 (NCR) names the store RetailStoreID, v6 BusinessUnit/UnitID.
            store=self.text(element, "RetailStoreID") or self.text(element, "BusinessUnit/UnitID"),
            workstation=self.text(element, "WorkstationID"),
            sequence=self.text(element, "SequenceNumber"),
            business_day=business_day,
            operator=self.text(element, "OperatorID"),
            transaction_id=self.text(element, "TransactionID"),
            status=(retail.get("TransactionStatus") if retail is not None else None) or "Finished",
            training=_truthy(element.get("TrainingModeFlag")),
            times=times,
        )
        if retail is not None:
            self._retail(retail, txn)
        if control is not None:
            self._control(control, txn)
        return txn

    def _link(self, link: ET.Element) -> tuple[str, LinkKey]:
        day = self.text(link, "BusinessDayDate") or self.text(link, "BusinessDayDate/Date")
        store = (
            self.text(link, "RetailStoreID")
            or self.text(link, "BusinessUnit/UnitID")
            or self.text(link, "BusinessUnit")
        )
        return (
            link.get("ReasonCode") or "",
            (store, self.text(link, "WorkstationID"), day, self.text(link, "SequenceNumber")),
        )

    def _control(self, control: ET.Element, txn: _Transaction) -> None:
        post_void = control.find(self.q("PostVoid"))
        if post_void is not None:
            txn.post_void = True
            for link in post_void.iter(self.q("TransactionLink")):
                txn.links.append(self._link(link))

    def _retail(self, retail: ET.Element, txn: _Transaction) -> None:
        money = txn.money
        rewards: list[_Reward] = []
        line_tax: list[Decimal] = []
        item_tax: list[Decimal] = []
        tax_flags: set[bool] = set()
        for link in retail.findall(self.q("TransactionLink")):
            txn.links.append(self._link(link))
        if txn.status == "PostVoided":
            txn.post_void = True
        for position, item in enumerate(retail.findall(self.q("LineItem")), start=1):
            sequence = self.text(item, "SequenceNumber")
            line_no = int(sequence) if sequence and sequence.isdigit() else None
            if _truthy(item.get("CancelFlag")):
                txn.counts["line_items.cancelled"] += 1
                continue
            void = _truthy(item.get("VoidFlag"))
            handled = False
            for child in item:
                name = _local(child.tag)
                if not child.tag.startswith(self.ns or "\0") and self.ns:
                    continue
                if name in ("Sale", "Return"):
                    line = self._line(child, name == "Return", void, line_no or position, txn)
                    if line is not None:
                        txn.lines.append(line)
                    handled = True
                elif name == "Discount":
                    self._discount(child, txn)
                    handled = True
                elif name == "LoyaltyReward":
                    reward = self._reward(child, money)
                    if reward is not None:
                        rewards.append(reward)
                    else:
                        txn.counts["rewards.non_monetary"] += 1
                    handled = True
                elif name == "Tax":
                    amount = money.read(self.text(child, "Amount"))
                    if amount is not None:
                        line_tax.append(-amount if void else amount)
                    self._tax_flag(child, tax_flags)
                    handled = True
                elif name == "Tender":
                    self._tender(child, txn)
                    handled = True
                elif name == "TenderChange":
                    self._tender_change(child, txn)
                    handled = True
                elif name == "Rounding":
                    value = money.read(self.text(child, "Amount") or (child.text or "").strip() or None)
                    if value is not None:
                        txn.rounding += self._directed(value, child.get("RoundingDirection"))
                    handled = True
            if not handled:
                txn.counts["line_items.other"] += 1
        for line_element in retail.iter(self.q("Sale")):
            for tax in line_element.findall(self.q("Tax")):
                amount = money.read(self.text(tax, "Amount"))
                if amount is not None:
                    item_tax.append(amount)
                self._tax_flag(tax, tax_flags)
        totals = {total.get("TotalType"): total.text for total in retail.findall(self.q("Total"))}
        txn.grand_total = money.read(totals.get("TransactionGrandAmount"))
        txn.source_net = money.read(totals.get("TransactionNetAmount"))
        txn.source_tax = money.read(totals.get("TransactionTaxAmount"))
        # Tax line items are the transaction's tax (NCR, Retalix); Retalix repeats them per item, so
        # item-level tax is only the fallback (Visma); roqqio has only the TransactionTaxAmount total.
        if line_tax:
            txn.tax = sum(line_tax, ZERO)
        elif item_tax:
            txn.tax = sum(item_tax, ZERO)
        else:
            txn.tax = txn.source_tax
        if txn.tax is not None and txn.source_tax is not None and txn.tax != txn.source_tax:
            txn.notes.append(f"tax lines sum to {txn.tax} but TransactionTaxAmount is {txn.source_tax}")
        if len(tax_flags) == 1:
            txn.prices_include_tax = tax_flags.pop()
        elif tax_flags:
            txn.notes.append("TaxIncludedInTaxableAmountFlag is true on some tax lines and false on others")
        self._net_voids(txn)
        self._count_rewards(rewards, txn)

    @staticmethod
    def _directed(value: Decimal, direction: str | None) -> Decimal:
        if direction == "Down":
            return -abs(value)
        if direction == "Up":
            return abs(value)
        return value

    def _tax_flag(self, tax: ET.Element, flags: set[bool]) -> None:
        taxable = tax.find(self.q("TaxableAmount"))
        if taxable is not None and taxable.get("TaxIncludedInTaxableAmountFlag") is not None:
            flags.add(_truthy(taxable.get("TaxIncludedInTaxableAmountFlag")))

    def _line(self, sale: ET.Element, is_return: bool, void: bool, line_no: int, txn: _Transaction) -> _Line | None:
        money = txn.money
        item_id = self.text(sale, "ItemID")
        gtin = other_id = None
        for identity in sale.findall(self.q("POSIdentity")):
            value = self.text(identity, "POSItemID")
            if identity.get("POSIDType") == "GTIN":
                gtin = gtin or value
            else:
                other_id = other_id or value
        item_id = item_id or other_id or gtin
        amount = money.read(self.text(sale, "ExtendedAmount"))
        quantities = sale.findall(self.q("Quantity"))
        if amount is None or item_id is None:
            missing = "ExtendedAmount" if amount is None else "ItemID/POSItemID"
            txn.notes.append(f"line {line_no}: no {missing}; line left out")
            txn.counts["lines.unreadable"] += 1
            return None
        qty = Decimal(1)
        if quantities:
            try:
                qty = Decimal((quantities[0].text or "1").strip())
            except InvalidOperation:
                txn.notes.append(f"line {line_no}: quantity {quantities[0].text!r} is not a number; read as 1")
            if len(quantities) > 1:
                # Retalix writes a weighed item's each-count and its weight: the first is the unit sold.
                txn.counts["lines.two_quantities"] += 1
        if qty != qty.quantize(QTY_PLACES):
            txn.notes.append(f"line {line_no}: quantity {qty} rounded to 3 decimals")
        qty = qty.quantize(QTY_PLACES)
        # roqqio encodes a return as a Sale with quantity −1, SalesMode RETOUR and a positive amount.
        sales_mode = self.extension_text(sale, "SalesMode")
        if sales_mode == "RETOUR":
            is_return = True
        price = money.read(self.text(sale, "ActualSalesUnitPrice")) or money.read(
            self.text(sale, "RegularSalesUnitPrice")
        )
        discount = ZERO
        for modifier in sale.findall(self.q("RetailPriceModifier")):
            modifier_amount = money.read(self.text(modifier, "Amount"))
            if modifier_amount is not None:
                discount += abs(modifier_amount)
        if not discount:
            # NCR ACS states a line's price reduction as DiscountAmount (0.00 throughout the sample).
            discount = abs(money.read(self.text(sale, "DiscountAmount")) or ZERO)
        if is_return:
            qty, amount = -abs(qty), -abs(amount)
        if price is None:
            price = cents(amount / qty) if qty else amount
        # The unit price carries the sign that makes qty × price the amount (a bottle-deposit refund
        # is quantity 1 at −2.00; a void reversal is quantity −1 at 2.79).
        price = abs(price) if (amount >= 0) == (qty >= 0) else -abs(price)
        discount = discount if amount >= 0 else -discount
        item_type = sale.get("ItemType")
        return _Line(
            line_no=line_no,
            item_id=item_id,
            gtin=gtin,
            qty=qty,
            unit_price=price,
            amount=amount,
            discount=discount,
            is_return=is_return,
            void=void,
            description=self.text(sale, "Description"),
            # Visma writes an undeclared prefix into attribute values (VRExt:RXBag): keep the name only.
            item_type=item_type.rpartition(":")[2] if item_type else None,
        )

    def _net_voids(self, txn: _Transaction) -> None:
        """NCR's void reversal: a VoidFlag line with negative qty and amount cancels an earlier line."""
        kept: list[_Line] = []
        for line in txn.lines:
            if not line.void or line.amount >= 0:
                kept.append(line)
                continue
            target = next(
                (
                    earlier
                    for earlier in reversed(kept)
                    if earlier.item_id == line.item_id and earlier.amount == -line.amount and not earlier.void
                ),
                None,
            ) or next(
                (
                    earlier
                    for earlier in reversed(kept)
                    if earlier.item_id == line.item_id and earlier.amount > 0 and not earlier.void
                ),
                None,
            )
            if target is None:
                txn.notes.append(f"void line {line.line_no} reverses no earlier line of item {line.item_id}; kept")
                kept.append(line)
                continue
            target.qty += line.qty
            target.amount += line.amount
            target.discount += line.discount
            txn.counts["lines.void_reversals"] += 1
            if target.amount == 0 and target.qty == 0:
                kept.remove(target)
        txn.lines = kept

    def _discount(self, element: ET.Element, txn: _Transaction) -> None:
        amount = txn.money.read(self.text(element, "Amount"))
        if amount is None:
            return
        txn.discounts.append(
            {
                "kind": "discount",
                "amount": abs(amount),
                "reason": self.text(element, "ReasonCode") or self.text(element, "Description"),
                "id": self.text(element, "PromotionID") or self.text(element, "DiscountID"),
            }
        )

    def _reward(self, element: ET.Element, money: _Money) -> _Reward | None:
        """A loyalty reward worth money (NCR: RewardCategory Monetary); offers and messages are not."""
        category = self.extension_text(element, "RewardCategory")
        amount = money.read(self.extension_text(element, "ExtendedRewardAmount") or self.text(element, "Amount"))
        if amount is None or amount == 0 or (category is not None and category != "Monetary"):
            return None
        attributes = {_local(name): value for name, value in element.attrib.items()}
        return _Reward(
            key=(self.text(element, "PromotionID") or "", self.text(element, "EventID") or ""),
            amount=amount,
            detailed=_truthy(attributes.get("detailedData")),
            summarized=_truthy(attributes.get("summarizedActivity")),
            reason=self.extension_text(element, "RewardType"),
        )

    def _count_rewards(self, rewards: list[_Reward], txn: _Transaction) -> None:
        """NCR lists a promotion's rewards per item (detailData) and again as one summary row
        (summarizedActivity only); INTEGRATIONS.md: 6 transactions do. Count the details, once."""
        detailed_keys = {reward.key for reward in rewards if reward.detailed}
        for reward in rewards:
            if reward.summarized and not reward.detailed and reward.key in detailed_keys:
                details = sum((r.amount for r in rewards if r.key == reward.key and r.detailed), ZERO)
                txn.counts["rewards.summary_rows_dropped"] += 1
                note = f"reward summary row of promotion {reward.key[0]} event {reward.key[1]} ({reward.amount})"
                if details != reward.amount:
                    note += f" differs from its detail rows ({details})"
                    txn.notes.append(note + "; the detail rows are counted")
                continue
            txn.discounts.append(
                {"kind": "reward", "amount": -reward.amount, "reason": reward.reason, "id": reward.key[0] or None}
            )

    def _tender(self, element: ET.Element, txn: _Transaction) -> None:
        money = txn.money
        rounding = element.find(self.q("Rounding"))
        if rounding is not None:
            value = money.read(rounding.text)
            if value:
                # Visma writes cash rounding as a tender holding only a Rounding with its direction.
                txn.rounding += self._directed(value, rounding.get("RoundingDirection"))
        amount = money.read(self.text(element, "Amount"))
        if amount is None:
            return
        tender_type = element.get("TenderType") or "other"
        if element.get("TypeCode") == "Refund":
            amount = -abs(amount)
        # NCR writes change as a second cash tender holding a TenderChange; its amount is already negative.
        txn.tenders.append({"type": TENDER_TYPES.get(tender_type, tender_type.lower()), "amount": amount})

    def _tender_change(self, element: ET.Element, txn: _Transaction) -> None:
        # roqqio: <TenderChange><TenderChange TenderType="Cash"><Amount>: change handed back.
        inner = element.find(self.q("TenderChange"))
        source = inner if inner is not None else element
        amount = txn.money.read(self.text(source, "Amount"))
        if amount is None:
            return
        tender_type = source.get("TenderType") or "Cash"
        txn.tenders.append({"type": TENDER_TYPES.get(tender_type, tender_type.lower()), "amount": -abs(amount)})


def _read_file(path: Path, report: ImportReport) -> Iterator[_Transaction]:
    """Stream the `Transaction` elements of a POSLog file (iterparse keeps memory flat on big logs).

    Only end events are asked for: an NCR log is mostly inline SVG signatures, and an event per
    element start would double the parse time. A `Transaction` is only ever a child of `POSLog`.
    """
    namespaces: dict[str, str] = {}
    reader: _Reader | None = None
    transaction_tag = ""
    index = 0
    last: ET.Element | None = None
    try:
        for event, item in ET.iterparse(path, events=("start-ns", "end")):
            if event == "start-ns":
                prefix, uri = item
                # The root's declarations come first; later ones (Retalix re-declares the default
                # namespace inside its extensions) must not replace them.
                namespaces.setdefault(prefix, uri)
                continue
            if reader is None:
                namespace = namespaces.get("", "")
                dialect = next(
                    (DIALECT_BY_NAMESPACE[uri] for uri in namespaces.values() if uri in DIALECT_BY_NAMESPACE),
                    "arts",
                )
                if namespace != IXRETAIL:
                    report.findings.append(f"{path.name}: POSLog namespace {namespace!r} is not IXRetail")
                reader = _Reader(namespace, dialect)
                transaction_tag = reader.q("Transaction")
                report.counts[f"dialect.{dialect}"] += 1
            last = item
            if item.tag == transaction_tag:
                index += 1
                yield reader.transaction(item, f"{path.name}#Transaction[{index}]")
                item.clear()  # done with it: keep memory flat
    except ET.ParseError as exc:
        line, column = exc.position
        raise PoslogFormatError(f"{path}:{line}:{column}: not well-formed XML ({exc})") from None
    if last is None or _local(last.tag) != "POSLog":
        found = "nothing" if last is None else repr(_local(last.tag))
        raise PoslogFormatError(f"{path.name}: the root element is {found}, not POSLog")


def _dialect(report: ImportReport) -> str:
    found = [name.partition(".")[2] for name in report.counts if name.startswith("dialect.")]
    return found[0] if found else "arts"


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def _likely_reason(difference: Decimal, txn: _Transaction, against: str, change: Decimal) -> str:
    if against == "tenders" and not txn.tenders:
        return "no tender" + (f" ({txn.status} transaction)" if txn.status not in SALE_STATUSES else "")
    if change and difference == change:
        return "change not recorded as a negative cash tender"
    if txn.rounding and difference == -txn.rounding:
        return "cash rounding not included"
    if txn.tax and abs(difference) == abs(txn.tax):
        return "tax counted on one side only (prices with or without tax)"
    if abs(difference) <= CENT and txn.money.long_decimals:
        return "source amounts with 3 or 5 decimals rounded to cents"
    if abs(difference) <= CENT:
        return "rounding in the till's own totals"
    return "unexplained: check the transaction in the till's journal"


@register_adapter
class PoslogAdapter(SourceAdapter):
    """ARTS POSLog files, every dialect in ../shared/data/poslog/ (see the module docstring)."""

    name = "poslog"

    def convert(self, path: Path, *, context: AdapterContext) -> Conversion:
        return self.convert_many([path], context=context)[0]

    def convert_many(self, paths: Sequence[Path], *, context: AdapterContext) -> list[Conversion]:
        """Several files as one import: a post-void in one file cancels a sale in another."""
        read: list[tuple[Path, ImportReport, list[_Transaction]]] = []
        for path in paths:
            report = ImportReport(source=SOURCE, file=str(path))
            read.append((path, report, list(_read_file(path, report))))
        everything = [txn for _path, _report, txns in read for txn in txns]
        present = {txn.link_key: txn for txn in everything if txn.kind == "retail"}
        cancelled: dict[LinkKey, _Transaction] = {}
        for txn in everything:
            if txn.post_void and not txn.training:
                for _reason, key in txn.links:
                    cancelled[key] = txn
        seen_keys: dict[str, tuple[str, dict[str, Any]]] = {}
        conversions = []
        for _path, report, txns in read:
            events: list[dict[str, Any]] = []
            for txn in txns:
                event = self._event(txn, report, context, present, cancelled)
                if event is None:
                    continue
                earlier = seen_keys.get(event["event_id"])
                if earlier is not None:
                    same = {k: v for k, v in earlier[1].items() if k != "source"} == {
                        k: v for k, v in event.items() if k != "source"
                    }
                    report.findings.append(
                        f"{txn.label}: same natural key as {earlier[0]}"
                        + ("" if same else " but different content; the ingest service keeps the first one")
                    )
                else:
                    seen_keys[event["event_id"]] = (txn.label, event)
                events.append(event)
            conversions.append(Conversion(events, report))
        return conversions

    def _event(
        self,
        txn: _Transaction,
        report: ImportReport,
        context: AdapterContext,
        present: dict[LinkKey, _Transaction],
        cancelled: dict[LinkKey, _Transaction],
    ) -> dict[str, Any] | None:
        report.counts["transactions"] += 1
        report.counts[f"transactions.{txn.kind}"] += 1
        if txn.kind != "retail":
            if txn.post_void:
                self._report_post_void(txn, report, present)
            return None
        report.counts[f"status.{txn.status}"] += 1
        for name, count in txn.counts.items():
            report.counts[name] += count
        for note in txn.notes:
            report.findings.append(f"{txn.label}: {note}")
        if txn.money.long_decimals:
            report.counts["amounts.more_than_2_decimals"] += txn.money.long_decimals
            if txn.money.changed:
                report.counts["amounts.changed_by_rounding_to_cents"] += txn.money.changed
        if txn.training:
            report.counts["skipped.training_mode"] += 1
            report.skip(txn.where, "training mode transaction: left out")
            return None
        if txn.status == "PostVoided" or txn.post_void:
            self._report_post_void(txn, report, present)
            return None
        if txn.link_key in cancelled:
            report.counts["skipped.post_voided"] += 1
            report.skip(txn.where, f"post-voided by {cancelled[txn.link_key].where}: no sale")
            self._reconcile(txn, report, context.prices_include_tax, counted=False)
            return None
        for reason, key in txn.links:
            if reason == "Resume" and key not in present:
                report.findings.append(
                    f"{txn.label}: resumes suspended transaction {'/'.join(str(k) for k in key)}, "
                    "which is not in this import; this transaction is the sale"
                )
        if txn.status not in SALE_STATUSES:
            reason = NO_SALE_STATUSES.get(txn.status, f"unknown TransactionStatus {txn.status!r}: not read as a sale")
            report.counts[f"skipped.status.{txn.status}"] += 1
            report.skip(txn.where, f"{txn.status}: {reason}")
            self._reconcile(txn, report, context.prices_include_tax, counted=False)
            return None
        missing = [
            name
            for name, value in (
                ("RetailStoreID or BusinessUnit/UnitID", txn.store),
                ("WorkstationID", txn.workstation),
                ("SequenceNumber", txn.sequence),
            )
            if not value
        ]
        if missing:
            report.counts["skipped.no_natural_key"] += 1
            report.skip(txn.where, f"no {', '.join(missing)}: the transaction has no natural key")
            return None
        store_id = context.map("store", txn.store)
        if store_id is None:
            report.counts["skipped.unmapped_store"] += 1
            report.skip(
                txn.where,
                f"store {txn.store!r} has no mapping to a StorePulse store "
                "(add a source_mappings row kind=store or pass --store-map)",
            )
            return None
        if not txn.lines:
            report.counts["skipped.no_lines"] += 1
            report.skip(txn.where, "no sale or return lines left (all voided or none): nothing to record")
            self._reconcile(txn, report, context.prices_include_tax, counted=False)
            return None
        if len(txn.lines) > MAX_LINES:
            report.counts["skipped.too_many_lines"] += 1
            report.skip(txn.where, f"{len(txn.lines)} lines; a receipt carries at most {MAX_LINES}")
            return None
        occurred_at = self._occurred_at(txn, store_id, context, report)
        if occurred_at is None:
            report.counts["skipped.no_time"] += 1
            report.skip(txn.where, "no readable EndDateTime, ReceiptDateTime or BeginDateTime")
            return None
        business_day = txn.business_day or occurred_at.date().isoformat()
        return self._build(txn, store_id, occurred_at, business_day, report, context)

    @staticmethod
    def _report_post_void(txn: _Transaction, report: ImportReport, present: dict[LinkKey, _Transaction]) -> None:
        report.counts["post_voids"] += 1
        if not txn.links:
            report.skip(txn.where, "PostVoided: voided after it was completed; no sale")
            return
        for _reason, key in txn.links:
            target = present.get(key)
            if target is not None:
                report.findings.append(f"{txn.label}: post-voids {target.where}, which is left out")
            else:
                report.findings.append(
                    f"{txn.label}: post-voids transaction {'/'.join(str(k) for k in key)}, which is not in "
                    "this import: nothing emitted; if it was imported before, it still counts"
                )
        report.skip(txn.where, "post-void transaction: no sale itself")

    @staticmethod
    def _occurred_at(
        txn: _Transaction, store_id: str, context: AdapterContext, report: ImportReport
    ) -> datetime | None:
        zone = context.zone(store_id)
        parsed = {name: _parse_time(text) for name, text in txn.times.items()}
        chosen = next(
            (
                parsed[name]
                for name in ("EndDateTime", "ReceiptDateTime", "BeginDateTime", "POSLogDateTime")
                if parsed.get(name)
            ),
            None,
        )
        if chosen is None:
            return None
        if chosen.tzinfo is None:
            # No offset: the store's wall clock (retail7 export notes; NCR and Visma write these).
            report.counts["times.read_in_store_zone"] += 1
            chosen = chosen.replace(tzinfo=zone)
        # roqqio writes the receipt time as local wall clock and Begin/End in UTC: the gap between
        # them is the till's UTC offset, which should be the store's.
        local = parsed.get("ReceiptDateTime")
        if local is not None and local.tzinfo is None and chosen.utcoffset() is not None:
            implied = local - chosen.astimezone(UTC).replace(tzinfo=None)
            expected = chosen.astimezone(zone).utcoffset() or timedelta(0)
            if abs(implied - expected) > timedelta(minutes=1):
                report.counts["times.zone_mismatch"] += 1
                report.findings.append(
                    f"{txn.label}: local ReceiptDateTime {txn.times['ReceiptDateTime']} is UTC"
                    f"{implied.total_seconds() / 3600:+g}h by EndDateTime {txn.times.get('EndDateTime')}, "
                    f"but the store's zone {zone.key} is UTC{expected.total_seconds() / 3600:+g}h; "
                    "the UTC time is used: check the store's time zone"
                )
        return chosen

    def _build(
        self,
        txn: _Transaction,
        store_id: str,
        occurred_at: datetime,
        business_day: str,
        report: ImportReport,
        context: AdapterContext,
    ) -> dict[str, Any]:
        kind = "return" if all(line.is_return for line in txn.lines) else "sale"
        sign = Decimal(-1) if kind == "return" else Decimal(1)
        used: set[int] = set()
        numbered = all(line.line_no is not None for line in txn.lines) and len(
            {line.line_no for line in txn.lines}
        ) == len(txn.lines)
        lines = []
        for position, line in enumerate(txn.lines, start=1):
            line_no = line.line_no if numbered and line.line_no is not None else position
            used.add(line_no)
            sku = context.map("sku", line.item_id) or context.map("sku", line.gtin) or line.item_id
            entry: dict[str, Any] = {
                "line_no": line_no,
                "sku": sku,
                "qty": _plain(line.qty),
                "unit_price": str(line.unit_price),
                "amount": str(line.amount),
            }
            if line.discount:
                entry["discount"] = str(line.discount)
            if line.description:
                entry["description"] = line.description[:200]
            if line.item_type:
                entry["item_type"] = line.item_type[:64]
            lines.append(entry)
        discounts = [
            {k: (str(sign * abs(v)) if k == "amount" else v) for k, v in discount.items() if v is not None}
            for discount in txn.discounts
        ]
        tax = txn.tax
        if tax is not None and tax * sign < 0:
            tax = sign * abs(tax)
        gross = sum((line.amount for line in txn.lines), ZERO)
        line_discounts = sum((line.discount for line in txn.lines), ZERO)
        receipt_discounts = sum((sign * abs(d["amount"]) for d in txn.discounts), ZERO)
        prices_include_tax = txn.prices_include_tax
        if prices_include_tax is None and tax and txn.grand_total is not None:
            # No flag: the grand total tells whether the tax was added to the prices (NCR) or not (roqqio).
            base = gross - line_discounts - receipt_discounts + txn.rounding
            if txn.grand_total == base:
                prices_include_tax = True
            elif txn.grand_total == base + tax:
                prices_include_tax = False
        effective = context.prices_include_tax if prices_include_tax is None else prices_include_tax
        total = gross - line_discounts - receipt_discounts + (ZERO if effective or tax is None else tax) + txn.rounding
        source = {
            "name": f"{SOURCE}:{_dialect(report)}",
            "store": txn.store,
            "workstation": txn.workstation,
            "sequence": txn.sequence,
            "business_day": business_day,
            "operator": txn.operator,
            "transaction_id": txn.transaction_id,
        }
        event: dict[str, Any] = {
            "type": "receipt",
            "event_id": natural_id(SOURCE, txn.store, txn.workstation, business_day, txn.sequence, txn.operator),
            "store_id": store_id,
            "terminal_id": txn.workstation,
            "receipt_id": (txn.transaction_id or txn.sequence or "")[:64],
            "occurred_at": occurred_at.isoformat(),
            "kind": kind,
            "lines": lines,
            "total": str(total),
            "source": {k: v[:64] for k, v in source.items() if v},
        }
        staff_id = context.map("staff", txn.operator)
        if staff_id:
            event["staff_id"] = staff_id
        elif txn.operator:
            report.counts["operators.unmapped"] += 1
        if discounts:
            event["discounts"] = discounts
        if tax is not None:
            event["tax"] = str(tax)
        if prices_include_tax is not None:
            event["prices_include_tax"] = prices_include_tax
        if txn.tenders:
            event["tenders"] = [{"type": t["type"], "amount": str(t["amount"])} for t in txn.tenders]
        if txn.rounding:
            event["rounding"] = str(txn.rounding)
        report.counts[f"events.{kind}"] += 1
        report.counts["lines"] += len(lines)
        report.add("gross", gross)
        report.add("line_discounts", line_discounts)
        report.add("receipt_discounts", receipt_discounts)
        report.add("discounts", line_discounts + receipt_discounts)
        report.add("tax", tax or ZERO)
        report.add("tenders", sum((t["amount"] for t in txn.tenders), ZERO))
        report.add("rounding", txn.rounding)
        report.add("total", total)
        if txn.grand_total is not None:
            report.add("source_grand_total", txn.grand_total)
        self._reconcile(txn, report, context.prices_include_tax, counted=True, total=total)
        return event

    @staticmethod
    def _reconcile(
        txn: _Transaction,
        report: ImportReport,
        chain_prices_include_tax: bool,
        *,
        counted: bool,
        total: Decimal | None = None,
    ) -> None:
        """Lines − discounts + tax (when prices exclude it) + rounding against tenders and grand total."""
        if total is None:
            gross = sum((line.amount for line in txn.lines), ZERO)
            discounts = sum((line.discount for line in txn.lines), ZERO) + sum(
                (abs(d["amount"]) for d in txn.discounts), ZERO
            )
            included = chain_prices_include_tax if txn.prices_include_tax is None else txn.prices_include_tax
            total = gross - discounts + (ZERO if included or txn.tax is None else txn.tax) + txn.rounding
        change = sum((t["amount"] for t in txn.tenders if t["amount"] < 0), ZERO)
        tendered = sum((t["amount"] for t in txn.tenders), ZERO)
        state = "" if counted else f" [{txn.status}, not counted]"
        checks: list[tuple[str, Decimal]] = [("tenders", tendered)]
        if txn.grand_total is not None:
            checks.append(("grand total", txn.grand_total))
        for against, value in checks:
            difference = value - total
            if difference:
                report.counts["transactions.not_reconciling"] += 1
                report.findings.append(
                    f"{txn.label}{state}: lines − discounts + tax + rounding = {total}, {against} {value} "
                    f"(difference {difference:+}): {_likely_reason(difference, txn, against, change)}"
                )
        if txn.source_net is not None and txn.source_tax is not None and txn.grand_total is not None:
            split = txn.source_net + txn.source_tax
            if split != txn.grand_total and txn.source_net != txn.grand_total:
                report.findings.append(
                    f"{txn.label}: the till's net {txn.source_net} + tax {txn.source_tax} = {split} is "
                    f"{txn.grand_total - split:+} off its grand total {txn.grand_total}: the till rounds its tax "
                    "split (its 3-decimal amounts); the lines and tenders are used"
                )


def report_lines(report: ImportReport) -> Iterable[str]:
    """The report as text, for the command line and the drop folder's report file."""
    yield f"{report.file}: {report.counts.get('transactions', 0)} transactions"
    for name, count in sorted(report.counts.items()):
        yield f"  {name}: {count}"
    for name, amount in sorted(report.totals.items()):
        yield f"  total {name}: {amount}"
    for skipped in report.skipped:
        yield f"  skipped {skipped}"
    for finding in report.findings:
        yield f"  finding {finding}"
