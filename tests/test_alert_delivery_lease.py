"""No notification is sent twice, even when a delivery pass outlasts the claim's lease: a slow
local robot (standing in for WeCom) answers each message after a second, a pass of several
messages runs past the lease, and a second deliverer polling meanwhile takes over only what the
first had not started sending. On SQLite and TimescaleDB."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select

from ingest.db import session_scope
from store_rules.alerts.delivery import DeliveryPolicy, deliver_due
from store_rules.alerts.models import Alert, Notification
from tests.recorder import RecordedRequest, RecordingServer
from tests.test_alert_delivery import use_channels
from tests.test_alerts import D1, D2

SEND_S = 1.0
# A lease longer than one send (1 s) but much shorter than a pass of 5 sends.
LEASE = DeliveryPolicy(backoff_s=0.05, backoff_max_s=0.2, max_attempts=5, lease_s=2.5, send_timeout_s=2.0)


class SlowRobot(RecordingServer):
    """Records each request when it arrives, then takes SEND_S before answering."""

    def _record(self, request: RecordedRequest) -> tuple[int, dict[str, object] | None]:
        answer = super()._record(request)
        time.sleep(SEND_S)
        return answer


def queue_alerts(engine: Engine, count: int) -> None:
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        for n in range(count):
            alert = Alert(
                dedup_key=f"k{n}", rule_id="dead_counter", rule_version=1, rule_type="silence", severity="low",
                store_id="S001", region_id="R-ZJ", subject=f"door-{n}", window_start=D1, window_end=D2,
                status="open", level="store", role="manager",
                summary={"zh-CN": f"温州鹿城店 door-{n} 无数据", "en": f"door-{n} silent"}, values={}, evidence=[],
                raised_at=now,
            )  # fmt: skip
            session.add(alert)
            session.flush()
            session.add(Notification(alert_id=alert.id, channel_id="managers", reason="raised", status="pending",
                                     attempts=0, next_attempt_at=now, created_at=now))  # fmt: skip


def test_a_pass_longer_than_the_lease_never_sends_a_message_twice(chain: Engine) -> None:
    with SlowRobot() as robot:
        use_channels(chain, [
            {"id": "managers", "adapter": "wecom", "config": {"url": f"{robot.url}/cgi-bin/webhook/send?key=m"},
             "audience": {"role": "manager"}, "rate_limit_per_minute": 20},
        ])  # fmt: skip
        queue_alerts(chain, 5)
        done = threading.Event()

        def first() -> None:
            try:
                deliver_due(engine=chain, worker="first", policy=LEASE)  # 5 sends, about 5 s
            finally:
                done.set()

        def second() -> None:
            time.sleep(0.3)
            while not done.is_set():  # a second scheduler's delivery job, polling
                deliver_due(engine=chain, worker="second", policy=LEASE)
                time.sleep(0.2)

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        deliver_due(engine=chain, worker="third", policy=LEASE)
        sent = Counter(r.json()["markdown"]["content"].split("\n")[0] for r in robot.requests)
    assert sorted(sent) == [f"# 【低】温州鹿城店 预警 #{n}" for n in range(1, 6)]
    assert [text for text, times in sent.items() if times > 1] == []
    with session_scope(chain) as session:
        rows = session.execute(select(Notification.status, Notification.attempts, Notification.claimed_by)).all()
    assert sorted(status for status, _, _ in rows) == ["sent"] * 5
    assert [attempts for _, attempts, _ in rows] == [1] * 5
    # The second deliverer took over the ones whose lease ran out before the first got to them.
    assert {worker for _, _, worker in rows} == {"first", "second"}


def test_a_stopped_pass_gives_back_what_it_did_not_send(chain: Engine) -> None:
    with SlowRobot() as robot:
        use_channels(chain, [
            {"id": "managers", "adapter": "wecom", "config": {"url": f"{robot.url}/send?key=m"},
             "audience": {"role": "manager"}, "rate_limit_per_minute": 20},
        ])  # fmt: skip
        queue_alerts(chain, 4)
        stop = threading.Event()
        threading.Timer(SEND_S * 1.5, stop.set).start()  # while the second message is on its way
        report = deliver_due(engine=chain, worker="stopping", policy=LEASE, stop=stop)
        assert (report.claimed, report.sent) == (4, 2)
        with session_scope(chain) as session:
            rows = session.execute(select(Notification.status, Notification.claimed_by).order_by(Notification.id)).all()
        assert [tuple(r) for r in rows] == [
            ("sent", "stopping"), ("sent", "stopping"), ("pending", None), ("pending", None),
        ]  # fmt: skip
        # Another worker sends the rest at once, without waiting for the lease.
        assert deliver_due(engine=chain, worker="next", policy=LEASE).sent == 2
        assert len(robot.requests) == 4


def test_a_lease_shorter_than_one_send_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lease_s: 5 s must be longer than one send \(send_timeout_s 10 s\)"):
        DeliveryPolicy(lease_s=5)
