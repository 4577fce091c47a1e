"""Shared fixtures: real TimescaleDB and SQLite databases, master data, a real Mosquitto.

Core tests take the `engine` fixture and run once per backend. TimescaleDB comes from the
local PostgreSQL 15 cluster prepared by infra/setup-timescaledb; in CI its absence is a
failure, on a laptop it is a skip with the reason.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from ingest.db import get_engine, session_scope
from ingest.migrate import upgrade
from ingest.models import EVENT_TABLES, Region, Sensor, Sku, Staff, Store, Terminal

PG_ADMIN_URL = os.environ.get("STOREPULSE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MQTT_HOST = os.environ.get("STOREPULSE_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("STOREPULSE_TEST_MQTT_PORT", "1883"))
# The public data sets beside the project (../shared/data); elsewhere when the checkout is elsewhere.
SHARED_DATA = Path(
    os.environ.get("STOREPULSE_TEST_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
IN_CI = os.environ.get("CI", "").lower() == "true"

TRUNCATE_ORDER = (
    "import_files",
    "import_watermarks",
    "source_mappings",
    "rollup_dirty",
    "rollup_store_day",
    "rollup_store_hour",
    "rollup_store_sku_day",
    "promotion_audit",
    "promotion_sets",
    "promotions",
    "promotion_acks",
    "safety_stock",
    "notification_attempts",
    "notifications",
    "alert_transitions",
    "alerts",
    "audit_log",
    "web_sessions",
    "users",
    "compliance_violations",
    "config_versions",
    *EVENT_TABLES,
    "dead_letters",
    "device_tokens",
    "members",
    "staff",
    "sensors",
    "terminals",
    "skus",
    "stores",
    "regions",
)


def unavailable(reason: str) -> None:
    """Skip on a developer machine, fail in CI: CI must exercise every real backend."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def shared_data_files(folder: str, pattern: str, what: str) -> list[Path]:
    """The files of a shared data set; missing data is `unavailable`: a skip on a laptop, a failure in CI."""
    directory = SHARED_DATA / folder
    files = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if not files:
        unavailable(
            f"{what} not found in {directory} (the shared data folder is not checked out there; "
            "STOREPULSE_TEST_SHARED_DATA names another place)"
        )
    return files


def create_timescale_database(prefix: str = "storepulse_test") -> str:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            available = conn.execute(
                text("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
            ).scalar()
            preload = conn.execute(text("SHOW shared_preload_libraries")).scalar() or ""
            if not available or "timescaledb" not in preload:
                unavailable("TimescaleDB is not installed: run infra/setup-timescaledb")
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # connection refused and the like
        unavailable(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    finally:
        admin.dispose()
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def drop_database(url: str) -> None:
    name = make_url(url).database
    get_engine(url).dispose()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def timescale_url() -> Iterator[str]:
    url = create_timescale_database()
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'storepulse.db'}"
    upgrade(url)
    return url


def empty_tables(engine: Engine) -> None:
    from store_rules.definitions import forget_active_definitions
    from store_rules.promotions.service import forget_cached_sets

    forget_active_definitions()
    forget_cached_sets()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TRUNCATE_ORDER)} RESTART IDENTITY CASCADE"))
        else:
            for table in TRUNCATE_ORDER:
                conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture(params=["sqlite", "timescale"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """A migrated, empty database; the test runs once on SQLite and once on TimescaleDB."""
    url = request.getfixturevalue(f"{request.param}_url")
    db = get_engine(url)
    empty_tables(db)
    return db


@pytest.fixture
def pg_engine(timescale_url: str) -> Engine:
    db = get_engine(timescale_url)
    empty_tables(db)
    return db


def load_small_chain(engine: Engine) -> None:
    """Two regions, three stores, a few SKUs: enough for contract and writer tests."""
    with session_scope(engine) as session:
        session.add_all(
            [
                Region(region_id="R-ZJ", name_zh="浙江区", name_en="Zhejiang"),
                Region(region_id="R-SH", name_zh="上海区", name_en="Shanghai"),
            ]
        )
        session.flush()
        session.add_all(
            [
                Store(
                    store_id="S001",
                    region_id="R-ZJ",
                    name_zh="温州鹿城店",
                    name_en="Wenzhou Lucheng",
                    city="温州",
                    timezone="Asia/Shanghai",
                ),
                Store(
                    store_id="S002",
                    region_id="R-ZJ",
                    name_zh="杭州西湖店",
                    name_en="Hangzhou Xihu",
                    city="杭州",
                    timezone="Asia/Shanghai",
                ),
                Store(
                    store_id="S003",
                    region_id="R-SH",
                    name_zh="上海徐汇店",
                    name_en="Shanghai Xuhui",
                    city="上海",
                    timezone="Asia/Shanghai",
                ),
            ]
        )
        session.flush()
        session.add_all(
            [
                Terminal(store_id="S001", terminal_id="T1", name="till 1"),
                Sensor(store_id="S001", sensor_id="door-1", name="main door"),
                Staff(staff_id="E0101", store_id="S001", name="李娜", role="pharmacist"),
                Sku(
                    sku="6901234567890",
                    name_zh="参松养心胶囊",
                    name_en="Shensong Yangxin capsules",
                    category="cardio",
                    is_rx=False,
                    flow_controlled=True,
                    prompt_triggering=True,
                    insurance_eligible=True,
                ),
            ]
        )


@pytest.fixture
def chain(engine: Engine) -> Engine:
    load_small_chain(engine)
    return engine


@pytest.fixture
def pg_chain(pg_engine: Engine) -> Engine:
    load_small_chain(pg_engine)
    return pg_engine


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mosquitto() -> tuple[str, int]:
    """The machine's real Mosquitto on 127.0.0.1:1883."""
    if not port_open(MQTT_HOST, MQTT_PORT):
        unavailable(f"Mosquitto is not listening on {MQTT_HOST}:{MQTT_PORT}")
    return MQTT_HOST, MQTT_PORT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The real app served by uvicorn on a loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 10 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_app(engine: Engine, **settings: object) -> object:
    from dashboard.app import create_app
    from ingest.settings import Settings

    return create_app(Settings(database_url=str(engine.url), **settings), engine=engine)  # type: ignore[arg-type]


@pytest.fixture
def live_server(chain: Engine) -> Iterator[LiveServer]:
    with LiveServer(make_app(chain)) as server:
        yield server


def sign_in(base_url: str, user_id: str, password: str, **client_options: Any) -> Any:
    """An httpx.Client with a page session, signed in through the real login form (CSRF included)."""
    import re

    import httpx

    client = httpx.Client(base_url=base_url, **{"timeout": 30, **client_options})
    form = client.get("/login")
    match = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert match, form.text[:500]
    response = client.post(
        "/login", data={"user_id": user_id, "password": password, "csrf_token": match.group(1), "next": "/"}
    )
    assert response.status_code == 303, response.text[:500]
    return client


def create_people(engine: Engine, people: dict[str, tuple[str, dict[str, str]]], password: str) -> None:
    """Users (user id → (role, scope)) who can sign in to the pages with `password`."""
    from ingest.users import create_user, set_password

    with session_scope(engine) as session:
        for user_id, (role, scope) in people.items():
            create_user(session=session, user_id=user_id, name=user_id, role=role, **scope)
            set_password(session=session, user_id=user_id, password=password)
