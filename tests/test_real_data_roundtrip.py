"""Real data through the real path: UCI Online Retail (December 2010) → MQTT → ingest worker → TimescaleDB.

The adapter `adapters.sources.online_retail` turns every invoice into a contract `receipt`; the test
publishes all of them with QoS 1 to the project's Mosquitto and an `IngestWorker` stores them. What
comes out of the database is compared, per local day and store, with what pandas reads straight
from the CSV files, without the adapter's code: the expectation states the mapping rules again
(store by invoice number, Europe/London dates, amount = quantity × price, cancellations are returns,
stock adjustments are not sales). Then everything is published a second time and nothing may change.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from adapters.sources.online_retail import Conversion, convert, day_files, event_topic
from ingest.contract import parse_event
from tests.brokers import Broker, mosquitto_broker, publisher, wait_until, worker_thread
from tests.conftest import SHARED_DATA, shared_data_files

DATA = SHARED_DATA / "online_retail"
STORES = ("S001", "S002", "S003")
Key = tuple[str, str]  # (local date, store)


def _data_files() -> list[Path]:
    return shared_data_files("online_retail", "*.csv", "UCI Online Retail files")


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with mosquitto_broker() as running:
        yield running


# --- the independent reading ----------------------------------------------------------------


def read_csv_with_pandas(files: list[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(path, dtype=str, keep_default_na=False) for path in files]
    return pd.concat(frames, ignore_index=True)


def expected_from_csv(frame: pd.DataFrame) -> tuple[dict[Key, tuple[int, Decimal]], Counter[Key], int]:
    """Per (local day, store): (line count, sum of amounts); receipts per key; rows left out."""
    qty = frame["Quantity"].astype(int)
    cancellation = frame["InvoiceNo"].str.startswith("C")
    # Rows that are no sale line: negative quantities outside cancellations (stock adjustments)
    # and cancellation rows that do not take anything back.
    not_a_line = (~cancellation & (qty < 0)) | (cancellation & (qty >= 0))
    # Prices the contract cannot carry exactly take their whole invoice out.
    price = frame["UnitPrice"].map(Decimal)
    bad_invoices = set(frame.loc[price.map(lambda p: p != p.quantize(Decimal("0.01")) or p < 0), "InvoiceNo"])
    keep = ~not_a_line & ~frame["InvoiceNo"].isin(bad_invoices)
    # A receipt has one time: the first row's. InvoiceDate is London wall-clock time, so the
    # local business day is its date part.
    day = frame.groupby("InvoiceNo", sort=False)["InvoiceDate"].transform("first").str.slice(0, 10)
    number = frame["InvoiceNo"].str.removeprefix("C").astype(int)
    store = number.map(lambda n: STORES[n % len(STORES)])
    amount = [Decimal(q) * p for q, p in zip(frame["Quantity"], price, strict=True)]
    kept = pd.DataFrame({"day": day, "store": store, "amount": amount, "invoice": frame["InvoiceNo"]})[keep]
    lines: dict[Key, tuple[int, Decimal]] = {}
    for (d, s), group in kept.groupby(["day", "store"]):
        lines[(str(d), str(s))] = (len(group), sum(group["amount"], Decimal("0.00")))
    receipts = Counter((str(d), str(s)) for d, s in kept.drop_duplicates("invoice")[["day", "store"]].itertuples(
        index=False))  # fmt: skip
    return lines, receipts, int((~keep).sum())


# --- the database side ----------------------------------------------------------------------


def stored_lines(engine: Engine) -> dict[Key, tuple[int, Decimal]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT (occurred_at AT TIME ZONE 'Europe/London')::date AS day, store_id, count(*), sum(amount) "
                "FROM receipt_lines GROUP BY 1, 2"
            )
        ).all()
    return {(day.isoformat(), store): (int(count), Decimal(total)) for day, store, count, total in rows}


def stored_receipts(engine: Engine) -> Counter[Key]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT (occurred_at AT TIME ZONE 'Europe/London')::date, store_id, count(*) "
                "FROM receipts GROUP BY 1, 2"
            )
        ).all()
    return Counter({(day.isoformat(), store): int(count) for day, store, count in rows})


def dead_letters(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r, p[:200]) for r, p in conn.execute(text("SELECT reason, raw_payload FROM dead_letters")).all()]


def publish_all(broker: Broker, conversion: Conversion, prefix: str) -> None:
    with publisher(broker) as pub:
        for event in conversion.events:
            pub.publish(event_topic(event, prefix), json.dumps(event), (event["event_id"],))
        pub.wait_all(timeout=60)


# --- the tests ------------------------------------------------------------------------------


def test_every_invoice_becomes_a_valid_receipt_and_the_skips_are_the_non_sales() -> None:
    files = _data_files()
    conversion = convert(day_files(DATA))
    frame = read_csv_with_pandas(files)
    lines, receipts, left_out = expected_from_csv(frame)

    for event in conversion.events:
        parse_event(event)  # raises ContractError if the adapter built anything the contract refuses
    assert len({e["event_id"] for e in conversion.events}) == len(conversion.events)
    assert len(conversion.events) == sum(receipts.values())
    assert sum(len(e["lines"]) for e in conversion.events) == sum(n for n, _ in lines.values())
    # The rows left out are exactly the stock adjustments (70 in December 2010) and nothing else.
    assert conversion.skipped_rows == left_out == 70
    assert {s.reason for s in conversion.skipped} == {"negative quantity on a sale invoice: stock adjustment"}
    kinds = Counter(e["kind"] for e in conversion.events)
    assert kinds["return"] == frame.loc[frame["InvoiceNo"].str.startswith("C"), "InvoiceNo"].nunique()
    assert {e["occurred_at"][-6:] for e in conversion.events} == {"+00:00"}  # GMT in December


def test_adapter_rules_on_a_small_file(tmp_path: Path) -> None:
    """The rules the real files do not exercise: bad prices, summer time, non-returning cancellations."""
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    rows = [
        "600001,A1,ONE,2,2011-07-01 09:30:00,1.25,12345.0,United Kingdom",  # summer time: +01:00
        "600001,A2,,3,2011-07-01 09:30:00,0.10,12345.0,United Kingdom",
        "600002,B1,X,1,2011-07-01 10:00:00,1.255,,France",  # 3 decimals: whole invoice out
        "600002,B2,Y,1,2011-07-01 10:00:00,1.00,,France",
        "C600003,C1,Z,-4,2011-12-01 10:00:00,2.50,,United Kingdom",
        "C600003,C2,W,1,2011-12-01 10:00:00,2.50,,United Kingdom",  # not taking anything back
        "600004,D1,damages,-7,2011-12-01 11:00:00,0,,United Kingdom",  # stock adjustment
    ]
    (tmp_path / "2011-07-01.csv").write_text(header + "\n".join(rows) + "\n")
    conversion = convert(day_files(tmp_path), stores=("S001", "S002"))

    assert [e["event_id"] for e in conversion.events] == ["uci-or-600001", "uci-or-C600003"]
    sale, cancellation = conversion.events
    assert (sale["store_id"], sale["occurred_at"], sale["kind"], sale["member_id"]) == (
        "S002", "2011-07-01T09:30:00+01:00", "sale", "12345",
    )  # fmt: skip
    assert [(line["line_no"], line["qty"], line["amount"]) for line in sale["lines"]] == [
        (1, 2, "2.50"),
        (2, 3, "0.30"),
    ]
    assert sale["total"] == "2.80"
    assert (cancellation["kind"], cancellation["total"], cancellation["occurred_at"]) == (
        "return", "-10.00", "2011-12-01T10:00:00+00:00",
    )  # fmt: skip
    for event in conversion.events:
        parse_event(event)
    assert [(s.invoice, s.line, s.rows) for s in conversion.skipped] == [
        ("600002", 4, 2),
        ("C600003", 7, 1),
        ("600004", 8, 1),
    ]
    assert "more than 2 decimals" in conversion.skipped[0].reason


def test_online_retail_round_trip_over_mqtt_matches_the_csv(
    pg_chain: Engine, timescale_url: str, broker: Broker
) -> None:
    files = _data_files()
    expected_lines, expected_receipts, _ = expected_from_csv(read_csv_with_pandas(files))
    conversion = convert(day_files(DATA))
    events = len(conversion.events)
    prefix = f"storepulse-rt-{uuid.uuid4().hex[:8]}/v1"

    with worker_thread(timescale_url, broker, topic_prefix=prefix) as worker:
        publish_all(broker, conversion, prefix)
        wait_until(lambda: worker.total_events >= events, 120, f"the worker to process {events} receipts")

        assert dead_letters(pg_chain) == []
        assert stored_receipts(pg_chain) == expected_receipts
        stored = stored_lines(pg_chain)
        assert set(stored) == set(expected_lines), "days × stores differ"
        for key, (count, amount) in expected_lines.items():
            assert stored[key] == (count, amount), f"{key}: stored {stored[key]}, CSV says {(count, amount)}"
        assert len(stored) == 20 * len(STORES)  # 20 trading days, each store sells every day

        # Everything again: every event is a redelivery now.
        publish_all(broker, conversion, prefix)
        wait_until(lambda: worker.total_events >= 2 * events, 120, "the worker to process the replay")
        assert worker.total_events == 2 * events
        assert stored_lines(pg_chain) == stored
        assert stored_receipts(pg_chain) == expected_receipts
        assert dead_letters(pg_chain) == []
