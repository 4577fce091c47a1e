"""Spreadsheet and CSV sales import (issue 13, point 4): profiles, the real Chaoyang export, encodings.

The Chaoyang pharmacy file is read independently of the adapter with pandas; what the adapter
stores through the ingest service must agree with that reading to the cent, month by month.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

from adapters.sources.base import AdapterContext, Conversion, get_adapter
from adapters.sources.sales_profiles import (
    PROFILES_DIR,
    ProfileError,
    load_profile,
    parse_profile,
    shipped_profiles,
)
from adapters.sources.sales_table import SalesFileRefused, SalesImportError, SalesImportReport, SalesTableAdapter
from ingest.db import session_scope
from ingest.models import Receipt, ReceiptLine
from ingest.service import ingest_payloads
from tests.conftest import shared_data_files

SHANGHAI = ZoneInfo("Asia/Shanghai")
DATE, CODE, NAME, LIST, PAID = ("购药时间", "商品编码", "商品名称", "应收金额", "实收金额")
NOON_2018_01_01 = datetime(2018, 1, 1, 12, 0, tzinfo=SHANGHAI)
CHAOYANG_CONTEXT = AdapterContext(mappings={"store": {"CHAOYANG": "S001"}})


@pytest.fixture(scope="module")
def chaoyang_file() -> Path:
    return shared_data_files("chaoyang_pharmacy", "*.xlsx", "the Chaoyang hospital pharmacy export")[0]


@pytest.fixture(scope="module")
def chaoyang_frame(chaoyang_file: Path) -> pd.DataFrame:
    return pd.read_excel(chaoyang_file)


@pytest.fixture(scope="module")
def chaoyang(chaoyang_file: Path) -> Conversion:
    return get_adapter("sales", profile="chaoyang_pharmacy").convert(chaoyang_file, context=CHAOYANG_CONTEXT)


def sales_report(conversion: Conversion) -> SalesImportReport:
    assert isinstance(conversion.report, SalesImportReport)
    return conversion.report


def money(value: Any) -> Decimal:
    """A cell as the exact decimal a person reads in Excel (24.64, not 24.6399999...)."""
    return Decimal(str(value))


def invalid_date_rows(frame: pd.DataFrame) -> set[int]:
    """Rows whose date part is no calendar date (the export has 2018-02-29), as spreadsheet rows."""
    dates = frame[DATE].dropna().astype(str).str[:10]
    parsed = pd.to_datetime(dates, format="%Y-%m-%d", errors="coerce")
    return {int(index) + 2 for index in parsed[parsed.isna()].index}


def empty_cell_rows(frame: pd.DataFrame) -> set[int]:
    return {int(index) + 2 for index in frame.index[frame.isna().any(axis=1)]}


def stored_net_by_month(engine: Engine) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Σ(amount − discount) of the stored lines and Σ net_total of the stored receipts, per local month."""
    lines: dict[str, Decimal] = defaultdict(Decimal)
    receipts: dict[str, Decimal] = defaultdict(Decimal)
    with session_scope(engine) as session:
        for at, amount, discount in session.execute(
            select(ReceiptLine.occurred_at, ReceiptLine.amount, ReceiptLine.discount)
        ):
            lines[at.astimezone(SHANGHAI).strftime("%Y-%m")] += amount - discount
        for at, net in session.execute(select(Receipt.occurred_at, Receipt.net_total)):
            assert net is not None
            receipts[at.astimezone(SHANGHAI).strftime("%Y-%m")] += net
    return dict(lines), dict(receipts)


def ingest(engine: Engine, events: list[dict[str, Any]]) -> list[str]:
    with session_scope(engine) as session:
        results = ingest_payloads(events, session=session, source="import:sales")
    return [result.status for result in results]


# --- the real export through the ingest service ----------------------------------------------


def test_chaoyang_export_stores_paid_amounts_per_month_exactly(
    chain: Engine, chaoyang_file: Path, chaoyang: Conversion, chaoyang_frame: pd.DataFrame
) -> None:
    report = sales_report(chaoyang)
    refused = {refused.row for refused in report.refused_rows}
    assert refused == empty_cell_rows(chaoyang_frame) | invalid_date_rows(chaoyang_frame)
    assert len(refused) == 25

    statuses = ingest(chain, chaoyang.events)
    assert statuses == ["accepted"] * len(chaoyang.events) == ["accepted"] * 5327

    accepted = chaoyang_frame.drop(index=[row - 2 for row in refused])
    expected = accepted.groupby(accepted[DATE].str[:7])[PAID].apply(lambda column: sum(map(money, column)))
    expected_by_month = {str(month): Decimal(total) for month, total in expected.items()}
    assert sorted(expected_by_month) == ["2018-01", "2018-02", "2018-03", "2018-04", "2018-05", "2018-06", "2018-07"]
    by_lines, by_receipts = stored_net_by_month(chain)
    assert by_lines == expected_by_month
    assert by_receipts == expected_by_month

    # Refused + stored is the whole column, and the report says both.
    whole_column = sum((money(v) for v in chaoyang_frame[PAID].dropna()), Decimal(0))
    assert whole_column == Decimal("304630.26")
    assert report.totals["imported_paid_amount"] == sum(expected_by_month.values()) == Decimal("303151.06")
    assert report.as_dict()["totals"]["refused_paid_amount"] == "1479.20"
    assert report.totals["imported_paid_amount"] + report.totals["refused_paid_amount"] == whole_column
    whole_list = sum((money(v) for v in chaoyang_frame[LIST].dropna()), Decimal(0))
    assert report.totals["imported_list_amount"] + report.totals["refused_list_amount"] == whole_list

    with session_scope(chain) as session:
        assert session.scalar(select(func.count()).select_from(Receipt)) == 5327
        assert session.scalar(select(func.count()).select_from(ReceiptLine)) == 6553
        returns = session.execute(select(Receipt.total).where(Receipt.kind == "return")).scalars().all()
        first = session.get(Receipt, ("sales:chaoyang_pharmacy:S001:2018-01-01:*******528:sale", NOON_2018_01_01))
    assert len(returns) == 16 and all(total < 0 for total in returns)
    assert sum(returns, Decimal(0)) == Decimal("-893.77") == report.totals["returns_paid_amount"]
    assert first is not None
    assert first.raw["time_assumed"] is True
    assert first.occurred_at.astimezone(SHANGHAI).isoformat() == "2018-01-01T12:00:00+08:00"
    assert (first.member_id, first.total, first.discount_total) == ("*******528", Decimal("104.50"), Decimal("13.80"))

    # A second import of the same file stores nothing new.
    again = get_adapter("sales", profile="chaoyang_pharmacy").convert(chaoyang_file, context=CHAOYANG_CONTEXT)
    assert ingest(chain, again.events) == ["duplicate"] * 5327
    assert stored_net_by_month(chain) == (expected_by_month, expected_by_month)


def test_chaoyang_report_names_every_refused_row_and_why(chaoyang: Conversion, chaoyang_frame: pd.DataFrame) -> None:
    reasons = {refused.row: refused.reason for refused in sales_report(chaoyang).refused_rows}
    assert reasons[6572] == "empty required cell: 购药时间 (date)"
    assert reasons[6576] == "empty row"
    for row in invalid_date_rows(chaoyang_frame):
        assert reasons[row] == "购药时间 (date) '2018-02-29 星期一' is not a valid date"
    # The same rows in the base report's skipped list, where a person finds them in the sheet.
    assert [skipped.where for skipped in chaoyang.report.skipped][-2:] == [
        "chaoyang_hospital_2018_sales.xlsx:Sheet1!6572",
        "chaoyang_hospital_2018_sales.xlsx:Sheet1!6576",
    ]
    counts = chaoyang.report.counts
    assert (counts["rows"], counts["rows_imported"], counts["rows_refused"]) == (6578, 6553, 25)
    assert (counts["receipts"], counts["sale_receipts"], counts["return_receipts"]) == (5327, 5311, 16)
    assert counts["receipts_time_assumed"] == 5327
    # 应收 < 实收 on 9 rows: stored at the paid amount, no negative discount.
    assert counts["rows_paid_above_list"] == 9


def test_chaoyang_shared_product_codes_are_reported_with_names_and_rows(
    chaoyang: Conversion, chaoyang_frame: pd.DataFrame
) -> None:
    frame = chaoyang_frame.dropna(subset=[CODE, NAME])
    expected: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, code, name in zip(frame.index, frame[CODE], frame[NAME], strict=True):
        # pandas reads the numbers of this mixed column as floats (236701.0); the sheet shows 236701
        shown = str(int(code)) if isinstance(code, float) and code.is_integer() else str(code)
        expected[shown][str(name).strip()].append(int(index) + 2)
    shared = {code: {name: rows for name, rows in names.items()} for code, names in expected.items() if len(names) > 1}
    assert sales_report(chaoyang).shared_codes == shared
    assert sorted(shared) == [
        "236701", "2367010", "2367011", "236702", "236703", "236704", "236705", "236709", "861368"
    ]  # fmt: skip
    assert set(shared["236701"]) == {"强力VC银翘片", "清热解毒口服液", "感康", "三九感冒灵"}
    assert any(
        finding.startswith("商品编码 (sku) 236701 has 4 names: 强力VC银翘片 (rows 2);")
        for finding in chaoyang.report.findings
    )
    assert chaoyang.report.as_dict()["shared_codes"]["236702"]["清热解毒口服液"] == [59]


def test_strict_mode_refuses_the_whole_file(chaoyang_file: Path) -> None:
    adapter = get_adapter("sales", profile="chaoyang_pharmacy", strict=True)
    with pytest.raises(SalesFileRefused) as refused:
        adapter.convert(chaoyang_file, context=CHAOYANG_CONTEXT)
    message = str(refused.value)
    assert message.startswith("chaoyang_hospital_2018_sales.xlsx: refused (strict): 25 rows could not be imported: ")
    assert "row 337: 购药时间 (date) '2018-02-29 星期一' is not a valid date" in message
    assert len(refused.value.report.refused_rows) == 25
    assert refused.value.report.counts["receipts"] == 0


@pytest.mark.parametrize("encoding", ["gb18030", "utf-8-sig", "utf-8"])
def test_csv_exports_in_each_encoding_import_the_same_figures(
    tmp_path: Path, chaoyang_file: Path, chaoyang: Conversion, encoding: str
) -> None:
    # The same export saved as CSV the way Excel does: cells as they are, no index column.
    frame = pd.read_excel(chaoyang_file, dtype=object)
    csv_path = tmp_path / f"chaoyang_{encoding}.csv"
    frame.to_csv(csv_path, index=False, encoding=encoding)
    if encoding == "gb18030":
        with pytest.raises(UnicodeDecodeError):
            csv_path.read_bytes().decode("utf-8")  # really not UTF-8: the detection has work to do

    profile = load_profile("chaoyang_pharmacy").model_copy(
        update={"file": load_profile("chaoyang_pharmacy").file.model_copy(update={"kind": "csv"})}
    )
    conversion = SalesTableAdapter(profile=profile).convert(csv_path, context=CHAOYANG_CONTEXT)

    assert f"encoding: {encoding} (detected)" in conversion.report.findings
    assert conversion.events == chaoyang.events
    assert conversion.report.totals == chaoyang.report.totals
    assert [(r.row, r.reason) for r in sales_report(conversion).refused_rows] == [
        (r.row, r.reason) for r in sales_report(chaoyang).refused_rows
    ]
    assert sales_report(conversion).shared_codes == sales_report(chaoyang).shared_codes


# --- a Hydee/INCA-style export with a receipt column ------------------------------------------

HYDEE_HEADER = (
    "门店编码,销售单号,收银机号,销售日期,销售时间,商品编码,商品名称,数量,单价,应收金额,实收金额,会员卡号,营业员"
)
HYDEE_ROWS = [
    "0101,XS001,2,2019-06-12,10:15:32,6901234567890,参松养心胶囊,2,36.50,73.00,70.00,VIP0088,E0101",
    "0101,XS001,2,2019-06-12,10:15:32,6920000000001,板蓝根颗粒,1,15.00,15.00,15.00,VIP0088,E0101",
    "0101,XS002,1,2019-06-12,11:00,6901234567890,参松养心胶囊,-1,36.50,-36.50,-35.00,,E0101",
    "0102,XS003,1,2019-06-12,,6920000000001,板蓝根颗粒,3,15.00,45.00,40.50,,",
    "0101,XS004,1,2019-06-12,12:00,6920000000001,板蓝根颗粒,1,15.00,15.00,,,E0101",
    "0101,XS005,1,2019-06-13,09:30,6920000000001,板蓝根颗粒,2,15.00,30.00,28.00,VIP0100,E0101",
    "0101,XS005,1,2019-06-13,09:30,6901234567890,参松养心胶囊,-1,36.50,-36.50,-36.50,VIP0100,E0101",
]
HYDEE_CONTEXT = AdapterContext(
    mappings={"store": {"0101": "S001", "0102": "S002"}, "sku": {"6920000000001": "BLG-001"}}
)


@pytest.fixture
def hydee_file(tmp_path: Path) -> Path:
    path = tmp_path / "销售明细.csv"
    path.write_bytes("\r\n".join([HYDEE_HEADER, *HYDEE_ROWS, ""]).encode("gb18030"))
    return path


def test_hydee_style_export_groups_by_receipt_number_and_splits_returns(chain: Engine, hydee_file: Path) -> None:
    conversion = get_adapter("sales", profile="hydee_pos_export").convert(hydee_file, context=HYDEE_CONTEXT)
    by_receipt = {event["receipt_id"]: event for event in conversion.events}
    assert list(by_receipt) == ["XS001", "XS002", "XS003", "XS005", "XS005-R"]

    sale = by_receipt["XS001"]
    assert sale["event_id"] == "sales:hydee_pos_export:S001:2019-06-12:XS001:sale"
    assert (sale["store_id"], sale["terminal_id"], sale["staff_id"], sale["member_id"]) == (
        "S001",
        "2",
        "E0101",
        "VIP0088",
    )
    assert sale["occurred_at"] == "2019-06-12T10:15:32+08:00" and "time_assumed" not in sale
    assert [(line["sku"], line["amount"], line.get("discount")) for line in sale["lines"]] == [
        ("6901234567890", "73.00", "3.00"),
        ("BLG-001", "15.00", None),
    ]
    assert sale["total"] == "85.00"
    assert sale["source"] == {"name": "sales:hydee_pos_export", "business_day": "2019-06-12", "store": "0101",
                              "sequence": "XS001", "workstation": "2"}  # fmt: skip

    returned = by_receipt["XS002"]
    assert returned["kind"] == "return"
    assert returned["lines"] == [
        {"line_no": 1, "sku": "6901234567890", "qty": "-1", "unit_price": "36.50", "amount": "-36.50",
         "discount": "-1.50", "description": "参松养心胶囊", "row": 4}
    ]  # fmt: skip
    assert returned["total"] == "-35.00"
    assumed = by_receipt["XS003"]
    assert (assumed["store_id"], assumed["occurred_at"], assumed["time_assumed"]) == (
        "S002",
        "2019-06-12T12:00:00+08:00",
        True,
    )
    assert (by_receipt["XS005"]["kind"], by_receipt["XS005-R"]["kind"]) == ("sale", "return")
    assert by_receipt["XS005-R"]["event_id"] == "sales:hydee_pos_export:S001:2019-06-13:XS005:return"

    assert [(r.row, r.reason) for r in sales_report(conversion).refused_rows] == [
        (6, "empty required cell: 实收金额 (paid_amount)")
    ]
    assert conversion.report.totals["refused_list_amount"] == Decimal("15.00")
    assert "encoding: gb18030 (detected)" in conversion.report.findings

    assert ingest(chain, conversion.events) == ["accepted"] * 5
    with session_scope(chain) as session:
        stored = {
            receipt_id: (net, discount)
            for receipt_id, net, discount in session.execute(
                select(Receipt.receipt_id, Receipt.net_total, Receipt.discount_total)
            )
        }
        line_discounts = session.execute(
            select(ReceiptLine.receipt_id, ReceiptLine.line_no, ReceiptLine.discount).order_by(
                ReceiptLine.receipt_id, ReceiptLine.line_no
            )
        ).all()
    assert stored == {
        "XS001": (Decimal("85.00"), Decimal("3.00")),
        "XS002": (Decimal("-35.00"), Decimal("-1.50")),
        "XS003": (Decimal("40.50"), Decimal("4.50")),
        "XS005": (Decimal("28.00"), Decimal("2.00")),
        "XS005-R": (Decimal("-36.50"), Decimal("0.00")),
    }
    assert [tuple(row) for row in line_discounts] == [
        ("XS001", 1, Decimal("3.00")),
        ("XS001", 2, Decimal("0.00")),
        ("XS002", 1, Decimal("-1.50")),
        ("XS003", 1, Decimal("4.50")),
        ("XS005", 1, Decimal("2.00")),
        ("XS005-R", 1, Decimal("0.00")),
    ]


def test_a_wrong_encoding_or_a_missing_column_names_the_file_and_the_field(hydee_file: Path, tmp_path: Path) -> None:
    with pytest.raises(
        SalesImportError, match=r"^销售明细\.csv: byte \d+ is not utf-8 \(set by the profile's file\.encoding\)"
    ):
        get_adapter("sales", profile="hydee_pos_export", encoding="utf-8").convert(hydee_file, context=HYDEE_CONTEXT)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(HYDEE_HEADER.replace("实收金额", "实收") + "\n" + HYDEE_ROWS[0] + "\n", encoding="utf-8")
    with pytest.raises(SalesImportError) as missing:
        get_adapter("sales", profile="hydee_pos_export").convert(renamed, context=HYDEE_CONTEXT)
    assert str(missing.value).startswith(
        "renamed.csv: row 1 has no column '实收金额' (columns.paid_amount) of profile 'hydee_pos_export'; "
        "the header reads: 门店编码, 销售单号"
    )


# --- the profile loader ---------------------------------------------------------------------

GOOD_PROFILE = """\
name: test_export
file:
  kind: csv
columns:
  date: 日期
  sku: 编码
  qty: 数量
  paid_amount: 实收
store:
  fixed: X1
receipts:
  group_by: [store, date]
  time_of_day: "09:30"
"""


def test_shipped_profiles_load() -> None:
    assert shipped_profiles() == ["chaoyang_pharmacy", "hydee_pos_export"]
    chaoyang = load_profile("chaoyang_pharmacy")
    assert (chaoyang.source, chaoyang.store.fixed, chaoyang.receipts.group_by) == (
        "sales:chaoyang_pharmacy", "CHAOYANG", ["store", "date", "member"])  # fmt: skip
    assert load_profile(PROFILES_DIR / "hydee_pos_export.yaml").columns.receipt == "销售单号"
    assert parse_profile(GOOD_PROFILE).required_fields() == ("date", "sku", "qty", "paid_amount")


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        (
            "  sku: 编码\n",
            "  skuu: 编码\n",
            "p.yaml:4: columns.sku: missing; this key is required; "
            "p.yaml:6: columns.skuu: unknown key (misspelt?); docs/sales-import.md lists the keys",
        ),
        ("  kind: csv\n", "  kind: xls\n", "p.yaml:3: file.kind: Input should be 'xlsx' or 'csv'"),
        (
            '  time_of_day: "09:30"\n',
            "  time_of_day: 12:00\n",
            'p.yaml:13: receipts.time_of_day: write the time in quotes, e.g. "12:00" '
            "(unquoted, YAML reads it as a number)",
        ),
        (
            "  group_by: [store, date]\n",
            "  group_by: [store, date, member]\n",
            "p.yaml:12: receipts.group_by: 'member' has no column in columns",
        ),
        (
            "  group_by: [store, date]\n",
            "  group_by: [store, day]\n",
            "p.yaml:12: receipts.group_by.1: Input should be 'store', 'date', 'member', 'staff' or 'terminal'",
        ),
        (
            "store:\n  fixed: X1\n",
            "",
            "p.yaml:1: store: map columns.store or set store.fixed (the export's store for every row)",
        ),
        (
            "  paid_amount: 实收\n",
            "  paid_amount: 数量\n",
            "p.yaml:8: columns.paid_amount: column '数量' is already mapped to qty",
        ),
        (
            "  paid_amount: 实收\n",
            "",
            "p.yaml:4: columns: map at least one of unit_price, list_amount, paid_amount: a line needs an amount",
        ),
        ("name: test_export\n", "name: test export\n", "p.yaml:1: name: String should match pattern"),
        (
            "store:\n",
            "required: [qty, list_amount]\nstore:\n",
            "p.yaml:9: required: 'list_amount' has no column in columns",
        ),
        (
            "  kind: csv\n",
            "  kind: csv\n  delimiter: [\n",
            "p.yaml:6: not valid YAML (expected ',' or ']', but got ':')",
        ),
    ],
)
def test_profile_errors_name_file_line_and_field(old: str, new: str, error: str) -> None:
    assert old in GOOD_PROFILE
    with pytest.raises(ProfileError) as raised:
        parse_profile(GOOD_PROFILE.replace(old, new), "p.yaml")
    assert str(raised.value).startswith(error)


def test_unknown_profile_and_missing_profile_option() -> None:
    with pytest.raises(
        ProfileError, match=r"no sales import profile named 'haidian' .* \(known: chaoyang_pharmacy, hydee_pos_export\)"
    ):
        get_adapter("sales", profile="haidian")
    with pytest.raises(ProfileError, match=r"^profile: the sales adapter needs a profile"):
        get_adapter("sales")
