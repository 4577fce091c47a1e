"""`storepulse scheduler` as real processes on TimescaleDB: one active at a time (advisory lock),
no duplicate alerts or notifications with two running, clean stop on SIGTERM, takeover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select

from ingest.db import session_scope
from store_rules.alerts.definitions import ChannelSet, load_rules_dir, store_channels
from store_rules.alerts.models import Alert, Notification
from tests.recorder import RecordedRequest, RecordingServer
from tests.test_alerts import RULES_DIR, insurance_day
from tests.test_metrics import SHANGHAI, ingest

REPO = Path(__file__).resolve().parents[1]


def start_scheduler(engine: Engine, robot_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STOREPULSE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "STOREPULSE_WECOM_ZJ_URL": f"{robot_url}/cgi-bin/webhook/send?key=zj",
        "STOREPULSE_NOTIFY_INTERVAL_S": "0.5",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "storepulse.cli", "scheduler"], cwd=REPO, env=env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def logs_of(folder: Path) -> str:
    return (folder / "first.log").read_text() + (folder / "second.log").read_text()


def test_two_schedulers_raise_and_notify_once_and_stop_on_sigterm(pg_chain: Engine, tmp_path: Path) -> None:
    today = datetime.now(SHANGHAI).date()
    d1, d2, d3 = (today - timedelta(days=n) for n in (3, 2, 1))  # the last three closed business days
    ingest(pg_chain, insurance_day(d1, 7, 3) + insurance_day(d2, 6, 4) + insurance_day(d3, 31, 19))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "pass_rate_watch.yaml").write_text((RULES_DIR / "pass_rate_watch.yaml").read_text("utf-8"), "utf-8")
    (rules / "channels.yaml").write_text(
        'channels:\n  - {id: wecom-zj, adapter: wecom, config: {url: "${STOREPULSE_WECOM_ZJ_URL}"},'
        " audience: {role: supervisor, regions: [R-ZJ]}}\n",
        "utf-8",
    )
    with session_scope(pg_chain) as session:
        load_rules_dir(session=session, directory=rules)
    with RecordingServer() as robot:
        first = start_scheduler(pg_chain, robot.url, tmp_path / "first.log")
        second = start_scheduler(pg_chain, robot.url, tmp_path / "second.log")
        try:
            assert robot.wait_for(1, timeout=30), (tmp_path / "first.log").read_text()
            time.sleep(3)  # both had time to evaluate and deliver, if both could
            assert len(robot.requests) == 1
            logs = logs_of(tmp_path)
            assert logs.count("scheduler lock acquired") == 1
            assert "another scheduler is active; waiting for the scheduler lock" in logs
            active, waiting = (first, second) if "lock acquired" in (tmp_path / "first.log").read_text() else (
                second, first)  # fmt: skip
            active.send_signal(signal.SIGTERM)
            assert active.wait(timeout=20) == 0
            # The waiting scheduler takes over, re-evaluates the same window and raises nothing new.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and logs_of(tmp_path).count("scheduler lock acquired") < 2:
                time.sleep(0.2)
            time.sleep(2)
            waiting.send_signal(signal.SIGTERM)
            assert waiting.wait(timeout=20) == 0
        finally:
            for process in (first, second):
                if process.poll() is None:
                    process.kill()
        logs = logs_of(tmp_path)
        assert logs.count("scheduler lock acquired") == 2, logs
        assert logs.count("scheduler stopped, lock released") == 2
        assert len(robot.requests) == 1
        content = robot.requests[0].json()["markdown"]["content"]
    assert "温州鹿城店 医保核验通过率连续 2 天低于 65%" in content and "王*国" in content
    with session_scope(pg_chain) as session:
        (alert,) = session.scalars(select(Alert)).all()
        assert (alert.store_id, alert.window_start, alert.window_end) == ("S001", d2, d3)
        (notification,) = session.scalars(select(Notification)).all()
        assert notification.status == "sent" and notification.attempts == 1


SLOW_SEND_S = 2.0
TAKEOVER_S = 15  # documented: the send in flight (at most 10 s) + the waiting scheduler's 5 s poll


class SlowRobot(RecordingServer):
    """A WeCom robot that records each message when it arrives and answers SLOW_SEND_S later."""

    def _record(self, request: RecordedRequest) -> tuple[int, dict[str, object] | None]:
        answer = super()._record(request)
        time.sleep(SLOW_SEND_S)
        return answer


def test_the_waiting_scheduler_takes_over_a_stopped_run_and_no_message_is_sent_twice(
    pg_chain: Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    with session_scope(pg_chain) as session:
        store_channels(session=session, source="test", channels=ChannelSet.model_validate({"channels": [
            {"id": "wecom-zj", "adapter": "wecom", "config": {"url": "${STOREPULSE_WECOM_ZJ_URL}"},
             "audience": {"role": "manager"}},
        ]}))  # fmt: skip
        for n in range(8):
            alert = Alert(
                dedup_key=f"k{n}", rule_id="dead_counter", rule_version=1, rule_type="silence", severity="low",
                store_id="S001", region_id="R-ZJ", subject=f"door-{n}", window_start=now.date(),
                window_end=now.date(), status="open", level="store", role="manager",
                summary={"zh-CN": f"door-{n} 无数据", "en": f"door-{n} silent"}, values={}, evidence=[],
                raised_at=now,
            )  # fmt: skip
            session.add(alert)
            session.flush()
            session.add(Notification(alert_id=alert.id, channel_id="wecom-zj", reason="raised", status="pending",
                                     attempts=0, next_attempt_at=now, created_at=now))  # fmt: skip
    with SlowRobot() as robot:
        first = start_scheduler(pg_chain, robot.url, tmp_path / "first.log")
        second = start_scheduler(pg_chain, robot.url, tmp_path / "second.log")
        try:
            assert robot.wait_for(2, timeout=60), logs_of(tmp_path)  # the second message is on its way
            active, waiting = (first, second) if "lock acquired" in (tmp_path / "first.log").read_text() else (
                second, first)  # fmt: skip
            stopped_at = time.monotonic()
            active.send_signal(signal.SIGTERM)
            # It finishes the message in flight and stops; it does not send the other six first.
            assert active.wait(timeout=60) == 0
            assert time.monotonic() - stopped_at < SLOW_SEND_S + 4, logs_of(tmp_path)
            while logs_of(tmp_path).count("scheduler lock acquired") < 2 and time.monotonic() - stopped_at < 60:
                time.sleep(0.1)
            assert time.monotonic() - stopped_at <= TAKEOVER_S, logs_of(tmp_path)
            assert robot.wait_for(8, timeout=8 * SLOW_SEND_S + 10), logs_of(tmp_path)
            time.sleep(1)
            waiting.send_signal(signal.SIGTERM)
            assert waiting.wait(timeout=60) == 0
        finally:
            for process in (first, second):
                if process.poll() is None:
                    process.kill()
        alert_ids = Counter(r.json()["markdown"]["content"].split("\n")[0] for r in robot.requests)
    assert sorted(alert_ids) == [f"# 【低】温州鹿城店 预警 #{n}" for n in range(1, 9)]
    assert [line for line, times in alert_ids.items() if times > 1] == []
    with session_scope(pg_chain) as session:
        rows = session.execute(select(Notification.status, Notification.attempts, Notification.claimed_by)).all()
    assert sorted((status, attempts) for status, attempts, _ in rows) == [("sent", 1)] * 8
    assert len({worker for _, _, worker in rows}) == 2  # each scheduler sent part of them
