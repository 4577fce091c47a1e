"""Master-data import from CSV and XLSX: validation with line numbers, all-or-nothing, upserts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

from ingest.db import session_scope
from ingest.masterdata import ImportReport, MasterDataError, import_file
from ingest.models import Region, Sku, Staff, Store

REGIONS = "region_id,name_zh,name_en\nR1,浙江区,Zhejiang\nR2,上海区,Shanghai\n"
STORES = (
    "store_id,region_id,name_zh,name_en,city,timezone\n"
    "S001,R1,温州鹿城店,Wenzhou Lucheng,温州,Asia/Shanghai\n"
    "S002,R1,杭州西湖店,Hangzhou Xihu,杭州,\n"
    "S003,R2,上海徐汇店,Shanghai Xuhui,上海,Asia/Shanghai\n"
)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def run(engine: Engine, path: Path, **kwargs: Any) -> list[ImportReport]:
    with session_scope(engine) as session:
        return import_file(path, session=session, **kwargs)


def rows(engine: Engine, model: type) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_import_then_reimport_updates_without_duplicating(engine: Engine, tmp_path: Path) -> None:
    (report,) = run(engine, write(tmp_path, "regions.csv", REGIONS))
    assert (report.inserted, report.updated, report.errors) == (2, 0, [])
    (report,) = run(engine, write(tmp_path, "stores.csv", STORES))
    assert report.inserted == 3
    renamed = STORES.replace("温州鹿城店", "温州鹿城旗舰店")
    (report,) = run(engine, write(tmp_path, "stores.csv", renamed))
    assert (report.inserted, report.updated) == (0, 3)
    assert rows(engine, Store) == 3
    with session_scope(engine) as session:
        store = session.get(Store, "S001")
        assert store is not None and store.name_zh == "温州鹿城旗舰店"
        s002 = session.get(Store, "S002")
        assert s002 is not None and s002.timezone == "Asia/Shanghai"


def test_bad_rows_are_reported_with_line_numbers_and_nothing_is_written(engine: Engine, tmp_path: Path) -> None:
    run(engine, write(tmp_path, "regions.csv", REGIONS))
    body = (
        "sku,name_zh,name_en,category,is_rx,flow_controlled,unit_price\n"
        "6901,参松养心胶囊,Shensong Yangxin,cardio,否,是,52.80\n"
        "6902,感康,Ganakang,cold,maybe,0,18.50\n"
        ",强力VC银翘片,Qiangli VC Yinqiao,cold,0,0,12.00\n"
        "6904,阿莫西林胶囊,Amoxicillin,antibiotic,1,1,9.999\n"
        "6901,重复,Duplicate,cardio,0,0,1.00\n"
    )
    (report,) = run(engine, write(tmp_path, "skus.csv", body))
    messages = [str(e) for e in report.errors]
    assert messages == [
        "line 3: is_rx: 'maybe' is not a yes/no value (use true/false, 1/0, yes/no, 是/否)",
        "line 4: sku: String should have at least 1 character",
        "line 5: unit_price: must be ≥ 0 with at most 2 decimals",
        "line 6: sku: duplicate of line 2",
    ]
    assert not report.written
    assert rows(engine, Sku) == 0


def test_skip_bad_rows_writes_the_good_ones(engine: Engine, tmp_path: Path) -> None:
    run(engine, write(tmp_path, "regions.csv", REGIONS))
    run(engine, write(tmp_path, "stores.csv", STORES))
    body = "staff_id,store_id,name,role\nE1,S001,李娜,pharmacist\nE2,S404,王强,cashier\nE3,S002,张敏,manager\n"
    (report,) = run(engine, write(tmp_path, "staff.csv", body), skip_bad_rows=True)
    assert [str(e) for e in report.errors] == ["line 3: store_id: unknown store 'S404'"]
    assert (report.written, report.inserted) == (True, 2)
    assert rows(engine, Staff) == 2


def test_xlsx_with_one_sheet_per_kind_resolves_references_inside_the_file(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "chain.xlsx"
    with pd.ExcelWriter(path) as writer:
        # Sheets in the "wrong" order on purpose: stores refer to regions defined later.
        pd.DataFrame(
            [{"store_id": "S9", "region_id": "R9", "name_zh": "宁波店", "name_en": "Ningbo", "city": "宁波"}]
        ).to_excel(writer, sheet_name="stores", index=False)
        pd.DataFrame([{"region_id": "R9", "name_zh": "宁波区", "name_en": "Ningbo"}]).to_excel(
            writer, sheet_name="regions", index=False
        )
    reports = run(engine, path)
    assert [(r.kind, r.inserted, r.errors) for r in reports] == [("regions", 1, []), ("stores", 1, [])]
    assert rows(engine, Region) == 1


def test_unknown_file_kind_and_unknown_columns_are_refused(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(MasterDataError, match="cannot tell which master data"):
        run(engine, write(tmp_path, "things.csv", "a,b\n1,2\n"))
    (report,) = run(engine, write(tmp_path, "regions.csv", "region_id,name_zh,name_en,colour\nR1,a,b,red\n"))
    assert [str(e) for e in report.errors] == ["header: unknown column(s) colour for regions"]
    (report,) = run(engine, write(tmp_path, "my-list.csv", REGIONS), kind="regions")
    assert report.inserted == 2
