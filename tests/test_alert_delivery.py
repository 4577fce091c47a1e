"""Alert delivery against local HTTP servers that record requests: retries while the channel
fails, exactly-once delivery after recovery, two workers racing, digests under the robots'
20-a-minute limit, DingTalk signatures, masked names."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from ingest.db import session_scope
from store_rules.alerts.definitions import ChannelSet, store_channels, store_rule
from store_rules.alerts.delivery import DeliveryPolicy, deliver_due
from store_rules.alerts.models import Alert, Notification, NotificationAttempt
from store_rules.alerts.service import evaluate_rule
from store_rules.definitions import forget_active_definitions
from tests.recorder import RecordingServer
from tests.test_alerts import D1, D2, D3, ingest, insurance_day, scenario, seed_rule

FAST = DeliveryPolicy(backoff_s=0.05, backoff_max_s=0.2, max_attempts=20, lease_s=30)


def use_channels(engine: Engine, channels: list[dict[str, object]]) -> ChannelSet:
    """Store a channel set as the one in force (delivery reads it from the database, like the scheduler)."""
    channel_set = ChannelSet.model_validate({"channels": channels})
    with session_scope(engine) as session:
        store_channels(session=session, channels=channel_set, source="test")
    forget_active_definitions()
    return channel_set


def raise_scenario_alert(engine: Engine, channels: ChannelSet) -> int:
    scenario(engine)
    rule = seed_rule()
    with session_scope(engine) as session:
        store_rule(session=session, rule=rule, source="test")
        for day in (D1, D2, D3):
            evaluate_rule(session=session, rule=rule, day=day, channels=channels)
        return session.scalars(select(Alert.id)).one()


def drain(engine: Engine, rounds: int = 50) -> None:
    for _ in range(rounds):
        deliver_due(engine=engine, policy=FAST)
        with session_scope(engine) as session:
            if not session.scalars(
                select(Notification.id).where(Notification.status.in_(["pending", "sending"]))
            ).all():
                return
        time.sleep(0.06)


def test_delivery_retries_while_the_channel_fails_and_delivers_once_when_it_recovers(chain: Engine) -> None:
    with RecordingServer() as robot:
        channels = use_channels(chain, [
            {"id": "zj", "adapter": "wecom", "config": {"url": f"{robot.url}/cgi-bin/webhook/send?key=zj"},
             "audience": {"role": "supervisor", "regions": ["R-ZJ"]}},
        ])  # fmt: skip
        alert_id = raise_scenario_alert(chain, channels)
        robot.respond(500, {"errcode": -1, "errmsg": "system busy"})
        for _ in range(4):
            deliver_due(engine=chain, policy=FAST)
            time.sleep(0.25)
        failing = len(robot.requests)
        assert failing >= 3, "delivery should retry while the robot answers 500"
        with session_scope(chain) as session:
            notification = session.scalars(select(Notification)).one()
            assert notification.status == "pending" and notification.attempts == failing
            assert "500" in (notification.last_error or "") or "busy" in (notification.last_error or "")
        robot.respond(200, {"errcode": 0, "errmsg": "ok"})
        drain(chain)
        for _ in range(3):  # later passes send nothing more
            deliver_due(engine=chain, policy=FAST)
        assert len(robot.requests) == failing + 1
        delivered = robot.requests[-1].json()
        with session_scope(chain) as session:
            notification = session.scalars(select(Notification)).one()
            assert notification.status == "sent" and notification.attempts == failing + 1
            attempts = session.scalars(select(NotificationAttempt).order_by(NotificationAttempt.id)).all()
            assert [a.ok for a in attempts] == [False] * failing + [True]
            assert [a.status_code for a in attempts][-1] == 200 and attempts[0].status_code == 500
    content = delivered["markdown"]["content"]
    assert f"#{alert_id}" in content and "医保核验通过率连续 2 天低于 65%" in content
    assert "王*国" in content and "王建国" not in content  # names masked in everything that leaves
    assert "M00000" not in content


def test_two_workers_racing_send_each_notification_once(chain: Engine) -> None:
    with RecordingServer() as hook:
        channels = use_channels(chain, [
            {"id": f"hook-{n}", "adapter": "webhook", "config": {"url": f"{hook.url}/{n}", "secret": "k"},
             "audience": {"role": "supervisor"}, "rate_limit_per_minute": 1000}
            for n in range(6)
        ])  # fmt: skip
        scenario(chain)
        ingest(chain, [e for d in (D1, D2, D3) for e in insurance_day(d, 1, 9, store_id="S003")])
        rule = seed_rule()
        for day in (D1, D2, D3):
            with session_scope(chain) as session:
                evaluate_rule(session=session, rule=rule, day=day, channels=channels)
        with session_scope(chain) as session:
            expected = len(session.scalars(select(Notification)).all())
        assert expected == 12  # 2 alerts × 6 channels
        barrier = threading.Barrier(2)

        def work(name: str) -> None:
            barrier.wait()
            deliver_due(engine=chain, worker=name, policy=FAST)

        threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deliver_due(engine=chain, policy=FAST)
        sent = sorted((r.path, r.json()["payload"]["alert_id"]) for r in hook.requests)
    assert len(sent) == expected and len(set(sent)) == expected


def test_more_alerts_than_the_robot_budget_are_merged_into_digests(chain: Engine) -> None:
    with RecordingServer() as robot:
        use_channels(chain, [
            {"id": "hq", "adapter": "wecom", "config": {"url": f"{robot.url}/send?key=hq"},
             "audience": {"role": "headquarters"}, "rate_limit_per_minute": 3},
        ])  # fmt: skip
        now = datetime.now(UTC)
        with session_scope(chain) as session:
            for n in range(10):
                alert = Alert(
                    dedup_key=f"k{n}", rule_id="r", rule_version=1, rule_type="silence", severity="low",
                    store_id="S001", region_id="R-ZJ", subject=f"door-{n}", window_start=D1, window_end=D2,
                    status="open", level="headquarters", role="headquarters",
                    summary={"zh-CN": f"温州鹿城店 door-{n} 无数据", "en": f"door-{n} silent"}, values={},
                    evidence=[], raised_at=now,
                )  # fmt: skip
                session.add(alert)
                session.flush()
                session.add(Notification(alert_id=alert.id, channel_id="hq", reason="raised", status="pending",
                                         attempts=0, next_attempt_at=now, created_at=now))  # fmt: skip
        report = deliver_due(engine=chain, policy=FAST)
        assert report.sent == 10 and report.messages <= 3 and report.digests >= 1
        assert len(robot.requests) <= 3
        text = "\n".join(r.json()["markdown"]["content"] for r in robot.requests)
        assert all(f"door-{n} 无数据" in text for n in range(10))
        # The budget is spent for this minute: a new alert waits instead of exceeding it.
        with session_scope(chain) as session:
            alert = session.scalars(select(Alert).where(Alert.dedup_key == "k0")).one()
            session.add(Notification(alert_id=alert.id, channel_id="hq", reason="escalated", status="pending",
                                     attempts=0, next_attempt_at=now, created_at=now))  # fmt: skip
        later = deliver_due(engine=chain, policy=FAST)
        assert later.deferred == 1 and len(robot.requests) == report.messages


def test_dingtalk_requests_are_signed_as_dingtalk_checks_them(chain: Engine) -> None:
    secret = "SEC0123456789abcdef"
    with RecordingServer() as robot:
        channels = use_channels(chain, [
            {"id": "zj-ding", "adapter": "dingtalk",
             "config": {"url": f"{robot.url}/robot/send?access_token=abc", "secret": secret},
             "audience": {"role": "supervisor", "regions": ["R-ZJ"]}},
        ])  # fmt: skip
        raise_scenario_alert(chain, channels)
        drain(chain)
        (request,) = robot.requests
    timestamp = request.query["timestamp"]
    # DingTalk's own check: HMAC-SHA256 over "timestamp\nsecret" keyed with the secret, base64.
    expected = base64.b64encode(
        hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    ).decode()
    assert request.query["sign"] == expected  # the recorder URL-decodes the query
    assert abs(int(timestamp) / 1000 - datetime.now(UTC).timestamp()) < 60
    assert request.query["access_token"] == "abc"
    assert "王*国" in request.json()["markdown"]["text"]


def test_an_unset_secret_fails_the_notification_with_the_reason(chain: Engine) -> None:
    channels = use_channels(chain, [
        {"id": "zj", "adapter": "wecom", "config": {"url": "${STOREPULSE_TEST_UNSET_URL}"},
         "audience": {"role": "supervisor", "regions": ["R-ZJ"]}},
    ])  # fmt: skip
    raise_scenario_alert(chain, channels)
    report = deliver_due(engine=chain, policy=FAST)
    assert report.failed == 1
    with session_scope(chain) as session:
        notification = session.scalars(select(Notification)).one()
        assert notification.status == "failed"
        assert "STOREPULSE_TEST_UNSET_URL is not set" in (notification.last_error or "")
