"""The `storepulse` command as an operator runs it (real subprocesses, a real SQLite file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.tokens import hash_token

STOREPULSE = [sys.executable, "-m", "storepulse"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "STOREPULSE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "STOREPULSE_ENV": "dev"}


def sp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STOREPULSE, *args], env=env, capture_output=True, text=True, timeout=60)


def test_upgrade_import_and_device_tokens(env: dict[str, str], tmp_path: Path) -> None:
    assert sp(env, "db", "upgrade").returncode == 0
    (tmp_path / "regions.csv").write_text("region_id,name_zh,name_en\nR1,浙江区,Zhejiang\n", encoding="utf-8")
    (tmp_path / "stores.csv").write_text(
        "store_id,region_id,name_zh,name_en\nS001,R1,温州鹿城店,Wenzhou Lucheng\n", encoding="utf-8"
    )
    for name in ("regions.csv", "stores.csv"):
        result = sp(env, "masterdata", "import", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert "1 inserted" in result.stdout

    created = sp(env, "device-token", "create", "--store", "S001", "--name", "till-1")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("spd_") and len(token) > 40

    listed = sp(env, "device-token", "list")
    assert "till-1" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout
    import sqlite3

    db = sqlite3.connect(tmp_path / "cli.db")
    stored = db.execute("SELECT token_hash FROM device_tokens").fetchall()
    assert stored == [(hash_token(token),)]
    assert token not in str(db.execute("SELECT * FROM device_tokens").fetchall())

    shown = sp(env, "metrics", "--store", "S001", "--day", "2026-11-20")
    assert shown.returncode == 0, shown.stderr
    assert "S001 2026-11-20 (Asia/Shanghai)" in shown.stdout
    assert "insurance pass rate          0 / 0" in shown.stdout
    unknown = sp(env, "metrics", "--store", "S404")
    assert unknown.returncode == 2 and "S404" in unknown.stderr

    assert sp(env, "device-token", "revoke", "1").returncode == 0
    assert "revoked" in sp(env, "device-token", "list").stdout
    again = sp(env, "device-token", "revoke", "1")
    assert again.returncode == 1 and "no active token" in again.stderr


def test_token_for_unknown_store_and_bad_import_fail_loudly(env: dict[str, str], tmp_path: Path) -> None:
    assert sp(env, "db", "upgrade").returncode == 0
    result = sp(env, "device-token", "create", "--store", "S404")
    assert result.returncode == 2 and "unknown store 'S404'" in result.stderr
    (tmp_path / "regions.csv").write_text("region_id,name_zh,name_en\nR1,,Zhejiang\n", encoding="utf-8")
    result = sp(env, "masterdata", "import", str(tmp_path / "regions.csv"))
    assert result.returncode == 1
    assert "line 2: name_zh: String should have at least 1 character" in result.stderr
    assert "nothing written" in result.stderr


def test_serving_outside_dev_with_the_placeholder_secret_is_refused(env: dict[str, str]) -> None:
    result = sp({**env, "STOREPULSE_ENV": "prod"}, "serve", "--port", "1")
    assert result.returncode != 0
    assert "STOREPULSE_SECRET_KEY is the placeholder" in result.stderr


def test_worker_needs_a_broker_url(env: dict[str, str]) -> None:
    result = sp({k: v for k, v in env.items() if k != "STOREPULSE_MQTT_URL"}, "ingest-worker")
    assert result.returncode == 2 and "STOREPULSE_MQTT_URL is not set" in result.stderr
