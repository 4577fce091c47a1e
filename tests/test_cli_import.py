"""`storepulse import ...` as an operator runs it: real subprocesses, real databases, a real server and broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from ingest.db import session_scope
from ingest.models import DeadLetter, Receipt
from ingest.tokens import create_token
from tests.conftest import LiveServer, make_app, shared_data_files

STOREPULSE = [sys.executable, "-m", "storepulse", "import"]
HEADER = "门店编码,销售单号,收银机号,销售日期,销售时间,商品编码,商品名称,数量,单价,应收金额,实收金额,会员卡号,营业员\n"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STOREPULSE, *args], env=env, capture_output=True, text=True, timeout=300)


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "STOREPULSE_DATABASE_URL": url, "STOREPULSE_ENV": "dev", **extra}


def receipts(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Receipt)) or 0)


@pytest.fixture
def ncr_file() -> Path:
    return next(p for p in shared_data_files("poslog/ncr_acs", "*.xml", "NCR POSLog files") if p.name == "POSLog.xml")


@pytest.fixture
def store_map(tmp_path: Path) -> Path:
    path = tmp_path / "stores.csv"
    path.write_text("external_id,store_id\n9,S001\n", encoding="utf-8")
    return path


def test_poslog_dry_run_then_import_then_all_duplicates(chain: Engine, ncr_file: Path, store_map: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    env = env_for(chain.url.render_as_string(hide_password=False))
    dry = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "[dry run: nothing stored or sent]" in dry.stdout
    assert "transactions.control 9" in dry.stdout and "transactions.retail 42" in dry.stdout
    assert receipts(chain) == 0

    report = tmp_path / "report.json"
    first = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--report-json", str(report))
    assert first.returncode == 0, first.stderr
    assert "  events: accepted 42, duplicate 0, rejected 0" in first.stdout
    assert first.stdout.rstrip().endswith("1 file(s): events accepted 42, duplicate 0, rejected 0")
    assert receipts(chain) == 42
    (body,) = json.loads(report.read_text(encoding="utf-8"))
    assert body["events"] == {"accepted": 42, "duplicate": 0, "rejected": 0, "sent": 0}
    assert body["counts"]["transactions.retail"] == 42

    again = run(env, "poslog", str(ncr_file), "--store-map", str(store_map))
    assert again.returncode == 0, again.stderr
    assert "events accepted 0, duplicate 42, rejected 0" in again.stdout
    assert receipts(chain) == 42

    unmapped = run(env, "poslog", str(ncr_file), "--dry-run")
    assert unmapped.returncode == 0
    assert (
        "POSLog.xml#Transaction[1]: store '9' has no mapping to a StorePulse store "
        "(add a source_mappings row kind=store or pass --store-map)" in unmapped.stdout
    )


def test_sales_rejections_strict_and_usage_errors(chain: Engine, tmp_path: Path) -> None:
    env = env_for(chain.url.render_as_string(hide_password=False))
    export = tmp_path / "sales.csv"
    export.write_text(
        HEADER
        + "S001,XS1,1,2024-06-12,10:15:32,6901234567890,参松养心胶囊,2,36.50,73.00,70.00,,E0101\n"
        + "S001,XS2,1,2024-06-12,10:20:00,,参松养心胶囊,1,36.50,36.50,36.50,,E0101\n"
        + "S999,XS3,1,2024-06-12,10:25:00,6901234567890,参松养心胶囊,1,36.50,36.50,36.50,,E0101\n",
        encoding="utf-8",
    )
    strict = run(env, "sales", str(export), "--profile", "hydee_pos_export", "--strict")
    assert strict.returncode == 1
    assert "error: file not imported: " in strict.stdout
    assert receipts(chain) == 0

    lenient = run(env, "sales", str(export), "--profile", "hydee_pos_export")
    assert lenient.returncode == 1, lenient.stdout  # the unknown store's receipt was rejected
    assert "  events: accepted 1, duplicate 0, rejected 1" in lenient.stdout
    assert "sales:hydee_pos_export:S999:2024-06-12:XS3:sale: store_id: unknown store 'S999'" in lenient.stdout
    assert "    sales.csv:3: empty required cell: 商品编码 (sku)" in lenient.stdout
    assert receipts(chain) == 1
    with session_scope(chain) as session:
        letter = session.scalars(select(DeadLetter)).one()
        assert (letter.store_id, letter.source) == ("S999", "import:sales:hydee_pos_export:sales.csv")

    unknown = run(env, "sales", str(export), "--profile", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    no_profile = run(env, "sales", str(export))
    assert no_profile.returncode == 2 and "--profile" in no_profile.stderr
    no_db_profile = run(env, "db", "--profile", "nope", "--once")
    assert no_db_profile.returncode == 2
    assert "error: --profile: no database profile 'nope'" in no_db_profile.stderr
    bad_map = tmp_path / "map.csv"
    bad_map.write_text("store,target\n9,S001\n", encoding="utf-8")
    refused = run(env, "sales", str(export), "--profile", "hydee_pos_export", "--store-map", str(bad_map))
    assert refused.returncode == 2 and "the first line must be 'external_id,store_id'" in refused.stderr


def test_store_pc_pushes_to_a_remote_storepulse_over_http(chain: Engine, ncr_file: Path, store_map: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    with session_scope(chain) as session:
        token = create_token(session=session, store_id="S001", name="store-pc").token
        other = create_token(session=session, store_id="S002", name="wrong-pc").token
    # The store PC has no StorePulse database of its own: mappings come from --store-map only.
    env = env_for(f"sqlite:///{tmp_path / 'store-pc.db'}", STOREPULSE_IMPORT_TOKEN=token)
    with LiveServer(make_app(chain)) as server:
        pushed = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--to", server.url)
        assert pushed.returncode == 0, pushed.stderr
        assert "events accepted 42, duplicate 0, rejected 0" in pushed.stdout
        again = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--to", server.url)
        assert "events accepted 0, duplicate 42, rejected 0" in again.stdout
        wrong = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--to", server.url,
                    "--token", other)  # fmt: skip
        assert wrong.returncode == 1
        assert "rejected 42" in wrong.stdout
        assert "store_id: this device token publishes for store 'S002' only" in wrong.stdout
        bad = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--to", server.url,
                  "--token", "spd_not-a-token")  # fmt: skip
        assert bad.returncode == 1
        assert "HTTP 401 for the batch starting with event" in bad.stdout
    assert receipts(chain) == 42
    with session_scope(chain) as session:
        sources = set(session.scalars(select(DeadLetter.source)))
    assert sources == {"http:wrong-pc"}


def test_store_pc_pushes_over_mqtt_with_qos_1(mosquitto: tuple[str, int], ncr_file: Path, store_map: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    import paho.mqtt.client as mqtt

    host, port = mosquitto
    prefix = f"storepulse-test-{os.getpid()}/v1"
    received: list[tuple[str, int]] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = lambda _c, _u, message: received.append(
        (message.topic, len(json.loads(message.payload)["events"]))
    )
    client.connect(host, port)
    client.subscribe(f"{prefix}/#", qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        env = env_for(f"sqlite:///{tmp_path / 'store-pc.db'}", STOREPULSE_MQTT_TOPIC_PREFIX=prefix)
        sent = run(env, "poslog", str(ncr_file), "--store-map", str(store_map), "--to", f"mqtt://{host}:{port}")
        assert sent.returncode == 0, sent.stderr
        assert "  events: accepted 0, duplicate 0, rejected 0, sent 42" in sent.stdout
        deadline = threading.Event()
        for _ in range(100):
            if sum(n for _, n in received) == 42:
                break
            deadline.wait(0.1)
    finally:
        client.loop_stop()
        client.disconnect()
    assert sum(n for _, n in received) == 42
    assert {topic for topic, _ in received} <= {f"{prefix}/S001/pos/{ws}/events" for ws in map(str, range(1, 100))}


def test_http_push_retries_until_the_server_answers(chain: Engine) -> None:
    """Connection refused at first: the batch is sent again with backoff once the server is up."""
    import time

    from adapters.sources.base import Conversion, ImportReport
    from adapters.sources.importer import HttpDestination, deliver
    from tests import factories as f

    with session_scope(chain) as session:
        token = create_token(session=session, store_id="S001", name="late-pc").token
    server = LiveServer(make_app(chain))
    starter = threading.Timer(1.0, server.__enter__)
    starter.start()
    try:
        begun = time.monotonic()
        outcome = deliver(
            Conversion([f.receipt(1), f.receipt(2)], ImportReport("test")),
            HttpDestination(server.url, token, retries=8, backoff_s=0.3),
        )
        waited = time.monotonic() - begun
    finally:
        starter.join()
        server.__exit__(None, None, None)
    assert outcome.error is None
    assert dict(outcome.delivery) == {"accepted": 2}
    assert waited >= 0.9
    assert receipts(chain) == 2
