"""POSLog import: every file of the four dialects in ../shared/data/poslog, checked against the XML.

Each file is read twice: by the adapter (`adapters.sources.poslog`) and, independently, by a few
lines of ElementTree here that state the acceptance rules again (sale and return lines of the
transactions that count, roqqio's RETOUR lines negative, NCR's discounts as lines + tax − the
till's own grand total, so a reward summary row counted twice would show). What the ingest
service stores on SQLite and TimescaleDB must equal the independent reading, and a second import
must store nothing new. Synthetic files pin the rules the real ones do not exercise (statuses,
post-voids, training mode, Return items, price modifiers, discount items, rounding, mappings).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from adapters.sources.base import AdapterContext, cents, get_adapter
from adapters.sources.mappings import MappingFileError, load_context, read_mapping_file
from adapters.sources.poslog import PoslogAdapter, PoslogFormatError
from ingest.contract import ReceiptEvent, parse_event
from ingest.db import session_scope
from ingest.masterdata import import_file
from ingest.models import Receipt, ReceiptLine, SourceMapping
from ingest.service import ingest_payloads
from tests.conftest import empty_tables, load_small_chain, shared_data_files

NS = {"a": "http://www.nrf-arts.org/IXRetail/namespace/"}
# The files' stores onto the test chain: NCR store 9, Retalix 0610, roqqio 100/300, Visma 3000/3004.
STORE_MAP = """kind,source,external_id,target_id
store,poslog,9,S001
store,poslog,0610,S002
store,*,100,S003
store,poslog,300,S003
store,poslog,3000,S001
store,poslog,3004,S002
"""
DIALECTS = ("ncr_acs", "retalix", "roqqio", "pharmacy_se")


def independent_reading(path: Path) -> tuple[Decimal, Decimal, int]:
    """(Σ line amounts, Σ discounts, transactions that count) of a POSLog file, straight from the XML."""
    lines_total = discounts_total = Decimal(0)
    counted = 0
    for txn in ET.parse(path).getroot().findall("a:Transaction", NS):
        retail = txn.find("a:RetailTransaction", NS)
        if retail is None or txn.get("TrainingModeFlag") == "true":
            continue
        if retail.get("TransactionStatus", "Finished") not in ("Finished", "Totaled"):
            continue
        counted += 1
        txn_lines = Decimal(0)
        for item in retail.findall("a:LineItem", NS):
            for kind in ("Sale", "Return"):
                for line in item.findall(f"a:{kind}", NS):
                    amount = Decimal(line.findtext("a:ExtendedAmount", namespaces=NS) or "0")
                    qty = Decimal(line.findtext("a:Quantity", "1", NS))
                    if kind == "Return" or (qty < 0 < amount):  # roqqio: qty −1, RETOUR, positive amount
                        amount = -abs(amount)
                    txn_lines += amount
                    for modifier in line.findall("a:RetailPriceModifier/a:Amount", NS):
                        discounts_total += abs(Decimal(modifier.text or "0"))
            for discount in item.findall("a:Discount/a:Amount", NS):
                discounts_total += abs(Decimal(discount.text or "0"))
        if retail.find("a:LineItem/a:LoyaltyReward", NS) is not None:
            # NCR prices exclude tax: whatever the till took off is lines + tax − its grand total.
            tax = sum((Decimal(t.text or "0") for t in retail.findall("a:LineItem/a:Tax/a:Amount", NS)), Decimal(0))
            grand = Decimal(retail.findtext("a:Total[@TotalType='TransactionGrandAmount']", namespaces=NS) or "0")
            discounts_total += txn_lines + tax - grand
        lines_total += txn_lines
    return cents(lines_total), cents(discounts_total), counted


def store_map(tmp_path: Path) -> Path:
    path = tmp_path / "store_map.csv"
    path.write_text(STORE_MAP, encoding="utf-8")
    return path


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_file_stores_what_the_xml_says_and_a_second_import_nothing(
    engine: Engine, dialect: str, tmp_path: Path
) -> None:
    files = shared_data_files(f"poslog/{dialect}", "*.xml", f"POSLog {dialect} files")
    adapter = get_adapter("poslog")
    for path in files:
        # One file per database: two roqqio samples share a natural key with different amounts.
        empty_tables(engine)
        load_small_chain(engine)
        with session_scope(engine) as session:
            context = load_context(session=session, source="poslog", mapping_files=[store_map(tmp_path)])
        conversion = adapter.convert(path, context=context)
        expected_lines, expected_discounts, counted = independent_reading(path)

        with session_scope(engine) as session:
            results = ingest_payloads(conversion.events, session=session, source="poslog-test")
        assert [r.status for r in results] == ["accepted"] * counted, (path.name, [r.error for r in results])
        with session_scope(engine) as session:
            receipts = session.scalars(select(Receipt)).all()
            lines = session.scalars(select(ReceiptLine)).all()
            assert len(receipts) == counted, path.name
            assert sum((line.amount for line in lines), Decimal(0)) == expected_lines, path.name
            assert sum((r.discount_total for r in receipts), Decimal(0)) == expected_discounts, path.name
            assert {r.source_name for r in receipts} <= {
                f"poslog:{d}" for d in ("ncr_acs", "retalix", "roqqio", "visma")
            }

        again = adapter.convert(path, context=context)
        with session_scope(engine) as session:
            second = ingest_payloads(again.events, session=session, source="poslog-test")
        assert [r.status for r in second] == ["duplicate"] * counted, path.name
        with session_scope(engine) as session:
            assert len(session.scalars(select(Receipt)).all()) == counted
            assert len(session.scalars(select(ReceiptLine)).all()) == len(lines)


def test_ncr_report_counts_retail_and_control_and_every_transaction_reconciles() -> None:
    path = next(
        p for p in shared_data_files("poslog/ncr_acs", "POSLog.xml", "NCR ACS POSLog") if p.name == "POSLog.xml"
    )
    context = AdapterContext(mappings={"store": {"9": "S001"}})
    report = PoslogAdapter().convert(path, context=context).report
    assert report.counts["transactions"] == 51
    assert report.counts["transactions.retail"] == 42
    assert report.counts["transactions.control"] == 9
    assert report.counts["status.Finished"] == 42
    # 552 Sale lines, 4 of them void reversals netted with the line each reverses.
    assert report.counts["lines.void_reversals"] == 4
    assert report.counts["lines"] == 552 - 2 * 4
    # The promotion summary rows that repeat their detail rows are counted once ...
    assert report.counts["rewards.summary_rows_dropped"] == 4
    # ... which is what makes every transaction match its tenders and its grand total.
    assert report.counts["transactions.not_reconciling"] == 0
    assert report.totals["gross"] == Decimal("2789.57")
    assert report.totals["discounts"] == Decimal("203.00")
    assert report.totals["tax"] == Decimal("57.15")
    assert (
        report.totals["total"] == report.totals["tenders"] == report.totals["source_grand_total"] == Decimal("2643.72")
    )
    assert any("resumes suspended transaction 9/32/2017-10-01/111" in f for f in report.findings)


def test_visma_cancelled_receipt_is_no_sale_and_roqqio_returns_are_negative() -> None:
    context = AdapterContext(mappings={"store": {"3000": "S001", "100": "S003", "300": "S003"}})
    adapter = PoslogAdapter()
    arts4 = next(
        p for p in shared_data_files("poslog/pharmacy_se", "arts4.xml", "Visma arts4") if p.name == "arts4.xml"
    )
    cancelled = adapter.convert(arts4, context=context)
    assert cancelled.events == []
    assert cancelled.report.counts["status.Canceled"] == 1
    assert [str(s) for s in cancelled.report.skipped] == [
        "arts4.xml#Transaction[1]: Canceled: cancelled before tender: no sale"
    ]
    assert any(
        "tenders 0 (difference -33.48): no tender (Canceled transaction)" in f for f in cancelled.report.findings
    )

    returns = {p.name: p for p in shared_data_files("poslog/roqqio", "retoure*.xml", "roqqio returns")}
    retoure = adapter.convert(returns["retoure.xml"], context=context).events
    assert [(e["kind"], e["total"], e["tax"], e["tenders"]) for e in retoure] == [
        ("return", "-2.99", "-0.48", [{"type": "cash", "amount": "-2.99"}])
    ]
    assert [(line["qty"], line["unit_price"], line["amount"]) for line in retoure[0]["lines"]] == [
        ("-1", "2.99", "-2.99")
    ]
    linked = adapter.convert(returns["retoure_with_link.xml"], context=context).events
    assert [(line["qty"], line["amount"]) for e in linked for line in e["lines"]] == [("-1", "-1.29")]
    # Begin/End are UTC; the local receipt time is not used for occurred_at.
    assert retoure[0]["occurred_at"] == "2024-09-26T15:06:56.741000+00:00"


def test_roqqio_change_retalix_tax_and_visma_rounding() -> None:
    context = AdapterContext(mappings={"store": {"100": "S003", "0610": "S002", "3004": "S001"}})
    adapter = PoslogAdapter()
    [change] = adapter.convert(
        next(iter(shared_data_files("poslog/roqqio", "sale_with_tenderChange.xml", "roqqio"))), context=context
    ).events
    assert change["tenders"] == [{"type": "cash", "amount": "27.00"}, {"type": "cash", "amount": "-0.01"}]
    assert (change["total"], change["tax"], change["prices_include_tax"]) == ("26.99", "4.31", True)

    [retalix] = adapter.convert(
        next(iter(shared_data_files("poslog/retalix", "*.xml", "Retalix"))), context=context
    ).events
    # Transaction-level tax lines (0.00 + 0.66), not the per-item copies, and the TotalKey totals are not read.
    assert (retalix["tax"], retalix["prices_include_tax"], retalix["total"]) == ("0.66", True, "6.57")
    assert [line["qty"] for line in retalix["lines"]] == ["1", "1", "1"]
    assert retalix["occurred_at"] == "2016-08-22T15:21:54.483370+01:00"

    arts1 = next(
        p for p in shared_data_files("poslog/pharmacy_se", "arts1.xml", "Visma arts1") if p.name == "arts1.xml"
    )
    [visma] = adapter.convert(arts1, context=context).events
    assert (visma["rounding"], visma["total"], visma["tenders"]) == (
        "0.12",
        "22042.00",
        [{"type": "cash", "amount": "22042.00"}],
    )
    # No offset in the file: the store's wall clock (S001 is in Asia/Shanghai by default).
    assert visma["occurred_at"] == "2019-07-22T15:53:21+08:00"
    assert visma["lines"][0]["item_type"] == "RXBag"


def _txn(seq: int, body: str, *, status: str = "Finished", store: str = "77", extra: str = "", attrs: str = "") -> str:
    return f"""
  <Transaction{attrs}>
    <BusinessUnit><UnitID>{store}</UnitID></BusinessUnit>
    <WorkstationID>3</WorkstationID>
    <SequenceNumber>{seq}</SequenceNumber>
    <OperatorID>42</OperatorID>
    <RetailTransaction TransactionStatus="{status}">{extra}{body}</RetailTransaction>
    <BusinessDayDate>2019-06-12</BusinessDayDate>
    <EndDateTime>2019-06-12T10:{seq:02d}:00</EndDateTime>
  </Transaction>"""


def _sale(seq: int, amount: str, *, item: str = "111", qty: str = "1", kind: str = "Sale", inner: str = "") -> str:
    return f"""
      <LineItem><SequenceNumber>{seq}</SequenceNumber><{kind}>
        <POSIdentity POSIDType="GTIN"><POSItemID>690{item}</POSItemID></POSIdentity><ItemID>{item}</ItemID>
        <ExtendedAmount>{amount}</ExtendedAmount><Quantity>{qty}</Quantity>{inner}</{kind}></LineItem>"""


def _tender(seq: int, amount: str, extra: str = "") -> str:
    return (
        f"<LineItem><SequenceNumber>{seq}</SequenceNumber>"
        f'<Tender TenderType="Cash"{extra}><Amount>{amount}</Amount></Tender></LineItem>'
    )


def _link(seq: int, reason: str) -> str:
    return (
        f'<TransactionLink ReasonCode="{reason}"><BusinessUnit><UnitID>77</UnitID></BusinessUnit>'
        f"<WorkstationID>3</WorkstationID><SequenceNumber>{seq}</SequenceNumber>"
        "<BusinessDayDate>2019-06-12</BusinessDayDate></TransactionLink>"
    )


SYNTHETIC = f"""<?xml version="1.0" encoding="UTF-8"?>
<POSLog xmlns="http://www.nrf-arts.org/IXRetail/namespace/">{
    _txn(
        1,
        _sale(
            1,
            "20.00",
            qty="2",
            inner="<ActualSalesUnitPrice>10.00</ActualSalesUnitPrice>"
            "<RetailPriceModifier><Amount Action='Subtract'>2.00</Amount></RetailPriceModifier>",
        )
        + "<LineItem><SequenceNumber>2</SequenceNumber><Discount><Amount>1.00</Amount>"
        "<ReasonCode>member day</ReasonCode></Discount></LineItem>"
        + "<LineItem><SequenceNumber>3</SequenceNumber><Tax><TaxableAmount TaxIncludedInTaxableAmountFlag='true'>"
        "15.39</TaxableAmount><Amount>1.61</Amount></Tax></LineItem>"
        + _tender(4, "20.00")
        + "<LineItem><SequenceNumber>5</SequenceNumber><TenderChange><TenderChange TenderType='Cash'>"
        "<Amount>3.00</Amount></TenderChange></TenderChange></LineItem>",
    )
    + _txn(2, _sale(1, "5.00"), status="Canceled")
    + _txn(3, _sale(1, "5.00") + _tender(2, "5.00"), status="Voided")
    + _txn(4, _sale(1, "6.00"), status="Suspended")
    + _txn(5, _sale(1, "6.00") + _tender(2, "6.00"), status="Resumed", extra=_link(4, "Resume"))
    + _txn(6, _sale(1, "8.00") + _tender(2, "8.00"), attrs=' TrainingModeFlag="true"')
    + _txn(7, _sale(1, "9.00") + _tender(2, "9.00"))
    + _txn(8, _sale(1, "9.00"), status="PostVoided", extra=_link(7, "PostVoid"))
    + _txn(9, _sale(1, "4.00"), status="PostVoided", extra=_link(99, "PostVoid"))
    + _txn(10, _sale(1, "4.00", kind="Return") + _tender(2, "4.00", ' TypeCode="Refund"'))
    + _txn(11, _sale(1, "10.00") + _sale(2, "3.00", item="222", kind="Return") + _tender(3, "7.00"))
    + _txn(
        12,
        _sale(1, "9.97")
        + _tender(2, "10.00")
        + "<LineItem><SequenceNumber>3</SequenceNumber><Tender><Rounding RoundingDirection='Up'>0.03</Rounding>"
        "</Tender></LineItem>",
    )
    + _txn(13, _sale(1, "1.00") + _tender(2, "1.00"), store="88")
    + _txn(14, _sale(1, "1.005") + _tender(2, "1.00"))
}
  <Transaction><BusinessUnit><UnitID>77</UnitID></BusinessUnit><WorkstationID>3</WorkstationID>
    <SequenceNumber>15</SequenceNumber><ControlTransaction><NoSale/></ControlTransaction></Transaction>
</POSLog>
"""


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    path = tmp_path / "synthetic.xml"
    path.write_text(SYNTHETIC, encoding="utf-8")
    return path


CONTEXT = AdapterContext(
    mappings={"store": {"77": "S001"}, "sku": {"690111": "6901234567890"}, "staff": {"42": "E0101"}},
    store_zones={"S001": "Asia/Shanghai"},
)


def test_statuses_training_and_post_voids(synthetic: Path) -> None:
    conversion = PoslogAdapter().convert(synthetic, context=CONTEXT)
    by_sequence = {e["source"]["sequence"]: e for e in conversion.events}
    assert sorted(by_sequence, key=int) == ["1", "5", "10", "11", "12", "14"]
    report = conversion.report
    assert (report.counts["transactions.retail"], report.counts["transactions.control"]) == (14, 1)
    skipped = {s.where.rpartition("[")[2].rstrip("]"): s.reason for s in report.skipped}
    assert skipped == {
        "2": "Canceled: cancelled before tender: no sale",
        "3": "Voided: voided inside the transaction: no sale",
        "4": "Suspended: suspended: no sale (the transaction that resumes it is the sale)",
        "6": "training mode transaction: left out",
        "7": "post-voided by synthetic.xml#Transaction[8]: no sale",
        "8": "post-void transaction: no sale itself",
        "9": "post-void transaction: no sale itself",
        "13": "store '88' has no mapping to a StorePulse store "
        "(add a source_mappings row kind=store or pass --store-map)",
    }
    assert any("post-voids transaction 77/3/2019-06-12/99, which is not in this import" in f for f in report.findings)
    for event in conversion.events:
        assert isinstance(parse_event(event), ReceiptEvent)


def test_discounts_tax_change_returns_rounding_and_mapping(synthetic: Path) -> None:
    events = {e["source"]["sequence"]: e for e in PoslogAdapter().convert(synthetic, context=CONTEXT).events}
    first = events["1"]
    assert first["event_id"] == "poslog:77:3:2019-06-12:1:42"
    assert (first["store_id"], first["terminal_id"], first["receipt_id"], first["staff_id"]) == (
        "S001",
        "3",
        "1",
        "E0101",
    )
    assert first["occurred_at"] == "2019-06-12T10:01:00+08:00"
    # SKU by GTIN when the item id has no mapping.
    assert first["lines"] == [
        {"line_no": 1, "sku": "6901234567890", "qty": "2", "unit_price": "10.00", "amount": "20.00", "discount": "2.00"}
    ]
    assert first["discounts"] == [{"kind": "discount", "amount": "1.00", "reason": "member day"}]
    assert (first["tax"], first["prices_include_tax"], first["total"]) == ("1.61", True, "17.00")
    assert first["tenders"] == [{"type": "cash", "amount": "20.00"}, {"type": "cash", "amount": "-3.00"}]

    refund = events["10"]
    assert (refund["kind"], refund["total"], refund["tenders"]) == (
        "return",
        "-4.00",
        [{"type": "cash", "amount": "-4.00"}],
    )
    assert [(line["qty"], line["amount"]) for line in refund["lines"]] == [("-1", "-4.00")]
    mixed = events["11"]
    # A sale with a returned item: one sale receipt whose return line is negative (the contract allows it).
    assert (mixed["kind"], mixed["total"]) == ("sale", "7.00")
    assert [(line["sku"], line["qty"], line["amount"]) for line in mixed["lines"]] == [
        ("6901234567890", "1", "10.00"),
        ("222", "-1", "-3.00"),
    ]
    assert (events["12"]["rounding"], events["12"]["total"]) == ("0.03", "10.00")
    assert events["5"]["total"] == "6.00"  # the resumed transaction is the sale


def test_amounts_with_more_than_two_decimals_are_rounded_and_reported(synthetic: Path) -> None:
    conversion = PoslogAdapter().convert(synthetic, context=CONTEXT)
    [event] = [e for e in conversion.events if e["source"]["sequence"] == "14"]
    assert (event["lines"][0]["amount"], event["total"]) == ("1.01", "1.01")
    assert conversion.report.counts["amounts.changed_by_rounding_to_cents"] == 1
    assert any(
        "lines − discounts + tax + rounding = 1.01, tenders 1.00 (difference -0.01): "
        "source amounts with 3 or 5 decimals rounded to cents" in f
        for f in conversion.report.findings
    )


def test_a_broken_file_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cut.xml"
    path.write_text(SYNTHETIC[: len(SYNTHETIC) // 2], encoding="utf-8")
    with pytest.raises(PoslogFormatError, match=r"cut\.xml:\d+:\d+: not well-formed XML"):
        PoslogAdapter().convert(path, context=CONTEXT)


def test_mapping_files_csv_and_yaml(tmp_path: Path) -> None:
    yaml_file = tmp_path / "map.yaml"
    yaml_file.write_text(
        'source: poslog\nstore:\n  "9": S001\n  "0610": S002\nstaff:\n  "94": E0101\n', encoding="utf-8"
    )
    rows = read_mapping_file(yaml_file)
    assert [(r.kind, r.source, r.external_id, r.target_id, r.where) for r in rows] == [
        ("store", "poslog", "9", "S001", f"{yaml_file}:3"),
        ("store", "poslog", "0610", "S002", f"{yaml_file}:4"),
        ("staff", "poslog", "94", "E0101", f"{yaml_file}:6"),
    ]
    listed = tmp_path / "list.yml"
    listed.write_text("- {kind: sku, external_id: '00000000067591', target_id: '6901234567890'}\n", encoding="utf-8")
    assert [(r.kind, r.source, r.external_id) for r in read_mapping_file(listed)] == [("sku", "*", "00000000067591")]
    context = load_context(session=None, source="poslog", mapping_files=[store_map(tmp_path), yaml_file])
    assert context.map("store", "100") == "S003"  # a `*` row
    assert context.map("store", "0610") == "S002"
    assert context.map("staff", "94") == "E0101"


def test_a_bad_mapping_file_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,source,external_id,target_id\nstore,poslog,9,S001\nshop,poslog,10,S002\nstore,poslog,9,S003\n")
    with pytest.raises(MappingFileError) as caught:
        read_mapping_file(bad)
    assert str(caught.value).splitlines() == [
        f"{bad}:3: kind: Input should be 'store', 'sku' or 'staff'",
        f"{bad}:4: external_id: store '9' is mapped to 'S001' at {bad}:2 and to 'S003' here",
    ]
    header = tmp_path / "header.csv"
    header.write_text("kind,external,target_id\n")
    with pytest.raises(MappingFileError, match=r"header\.csv:1: header: unknown column\(s\) external; missing column"):
        read_mapping_file(header)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("store:\n  '9': S001\nsku:\n  '1': ''\n")
    with pytest.raises(MappingFileError, match=r"bad\.yaml:4: target_id: String should have at least 1 character"):
        read_mapping_file(bad_yaml)


def test_source_mappings_master_data_feed_the_adapter_context(engine: Engine, tmp_path: Path) -> None:
    load_small_chain(engine)
    path = tmp_path / "source_mappings.csv"
    path.write_text(STORE_MAP + "sku,poslog,00000000067591,6901234567890\n", encoding="utf-8")
    with session_scope(engine) as session:
        [report] = import_file(path, session=session)
    assert (report.kind, report.inserted, report.errors) == ("source_mappings", 7, [])
    with session_scope(engine) as session:
        assert session.get(SourceMapping, ("store", "*", "100")).target_id == "S003"  # type: ignore[union-attr]
        override = tmp_path / "override.csv"
        override.write_text("kind,source,external_id,target_id\nstore,poslog,9,S002\n", encoding="utf-8")
        context = load_context(session=session, source="poslog", mapping_files=[override])
    assert context.map("store", "9") == "S002"  # the file wins over the database
    assert context.map("store", "0610") == "S002"
    assert context.map("sku", "00000000067591") == "6901234567890"
    assert dict(context.store_zones) == {"S001": "Asia/Shanghai", "S002": "Asia/Shanghai", "S003": "Asia/Shanghai"}
    with session_scope(engine) as session:
        assert load_context(session=session, source="other", mapping_files=[]).map("store", "9") is None
