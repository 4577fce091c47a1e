"""`storepulse scheduler`: one APScheduler job per enabled rule, plus delivery, escalation and promotions.

The promotions job expires undecided drafts, ends promotions past their end and publishes any
promotion set still unpublished (e.g. the broker was away when a manager approved). The rollups
job recomputes the store-days that events marked dirty.

Only one scheduler is active per database: it holds a PostgreSQL advisory lock (a file lock
next to the database on SQLite) for as long as it runs; a second instance waits for it and
takes over when the first stops or dies. Jobs use stable ids, coalesce and
``max_instances=1``; SIGTERM stops the jobs cleanly and releases the lock.

Takeover: on SIGTERM the active scheduler finishes the send in flight (at most the 10 s send
timeout), gives back the notifications it had claimed but not sent, and releases the lock;
the waiting one polls the lock every ``wait_interval_s`` (5 s) and sends the rest. So it takes
over within 15 s, and no notification is sent by both. A scheduler that dies without stopping
(SIGKILL, a crash) loses the lock as soon as PostgreSQL sees its connection close; its claims
are taken over when their lease (``notify_lease_s``, 120 s) runs out, and only the message it
was sending at the moment it died, whose outcome nobody learned, may be sent again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from adapters.publish.base import PromotionPublisher
from ingest.db import session_scope
from store_rules import rollups
from store_rules.alerts.definitions import AnyRule, stored_rule, stored_rules
from store_rules.alerts.delivery import DeliveryPolicy, deliver_due
from store_rules.alerts.service import escalate_due, evaluate_rule
from store_rules.promotions import service as promotions

log = logging.getLogger(__name__)

# An arbitrary, fixed 64-bit key: every StorePulse scheduler of a database contends for it.
ADVISORY_LOCK_KEY = 0x53_50_5F_53_43_48_44  # "SP_SCHD"
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 300}


class LeaderLock:
    """The one-active-scheduler lock: a session-level advisory lock, or a file lock on SQLite."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Connection | None = None
        self._file: Any = None

    def try_acquire(self) -> bool:
        if self.engine.dialect.name == "postgresql":
            connection = self.engine.connect()
            got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY}).scalar())
            connection.commit()
            if got:
                self._connection = connection
            else:
                connection.close()
            return got
        database = make_url(str(self.engine.url)).database or "memory"
        path = Path(f"{database}.scheduler.lock")
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def alive(self) -> bool:
        """Whether the lock is still ours: the connection holding it may have been cut."""
        if self._file is not None:
            return True
        if self._connection is None:
            return False
        try:
            self._connection.execute(text("SELECT 1"))
            self._connection.commit()
            return True
        except Exception:
            return False

    def release(self) -> None:
        if self._connection is not None:
            try:
                self._connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                self._connection.commit()
            except Exception:
                log.warning("could not release the scheduler lock cleanly; closing its connection releases it")
            self._connection.close()
            self._connection = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class RuleScheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        policy: DeliveryPolicy | None = None,
        delivery_interval_s: float = 5.0,
        reload_interval_s: float = 60.0,
        wait_interval_s: float = 5.0,
        publisher: PromotionPublisher | None = None,
        promotions_interval_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.promotions_interval_s = promotions_interval_s
        self.policy = policy or DeliveryPolicy()
        self.delivery_interval_s = delivery_interval_s
        self.reload_interval_s = reload_interval_s
        self.wait_interval_s = wait_interval_s
        self.stop_event = threading.Event()
        self.lock = LeaderLock(engine)
        self.worker = f"scheduler-{os.getpid()}"
        self.scheduler: BackgroundScheduler | None = None
        self._rules: dict[str, str] = {}  # rule id → fingerprint of the scheduled version

    def _guard(self, name: str, function: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                function()
            except Exception:
                # A failing run is retried at its next tick; the scheduler itself keeps going.
                log.exception("job %s failed", name)

        return run

    def _evaluate(self, rule_id: str) -> None:
        with session_scope(self.engine) as session:
            rule = stored_rule(session=session, rule_id=rule_id)
            if rule is not None and rule.enabled:
                evaluate_rule(session=session, rule=rule)

    def _deliver(self) -> None:
        deliver_due(engine=self.engine, worker=self.worker, policy=self.policy, stop=self.stop_event)

    def _promotions(self) -> None:
        with session_scope(self.engine) as session:
            promotions.expire_due(session=session)
        if self.publisher is not None:
            promotions.publish_pending(engine=self.engine, publisher=self.publisher)

    def _rollups(self) -> None:
        # A bounded batch per transaction, until the backlog is gone or the minute is over.
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline:
            with session_scope(self.engine) as session:
                if not rollups.refresh(session=session):
                    return

    def _escalate(self) -> None:
        with session_scope(self.engine) as session:
            escalate_due(session=session)

    def sync_rule_jobs(self) -> None:
        """Add, reschedule or remove one job per enabled rule to match the versions in force."""
        assert self.scheduler is not None
        with session_scope(self.engine) as session:
            rules: dict[str, AnyRule] = {r.id: r for r in stored_rules(session=session, enabled_only=True)}
        for rule_id in list(self._rules):
            if rule_id not in rules:
                self.scheduler.remove_job(f"rule:{rule_id}")
                del self._rules[rule_id]
                log.info("rule %s: unscheduled", rule_id)
        for rule_id, rule in rules.items():
            fingerprint = f"{rule.version}:{rule.cadence_minutes}"
            if self._rules.get(rule_id) == fingerprint:
                continue
            self.scheduler.add_job(
                self._guard(f"rule:{rule_id}", lambda rid=rule_id: self._evaluate(rid)),  # type: ignore[misc]
                "interval", minutes=rule.cadence_minutes, id=f"rule:{rule_id}", name=f"evaluate {rule_id}",
                replace_existing=True, next_run_time=datetime.now(UTC),
            )  # fmt: skip
            self._rules[rule_id] = fingerprint
            log.info("rule %s v%d: every %s", rule_id, rule.version, rule.cadence)

    def _check_leadership(self) -> None:
        if not self.lock.alive():
            log.error("lost the scheduler lock (database connection gone): stopping the jobs")
            self.stop_event.set()

    def run(self) -> None:
        """Wait for the lock, run the jobs until stopped, release the lock."""
        announced = False
        while not self.stop_event.is_set():
            if self.lock.try_acquire():
                break
            if not announced:
                log.info("another scheduler is active; waiting for the scheduler lock")
                announced = True
            self.stop_event.wait(self.wait_interval_s)
        if self.stop_event.is_set():
            return
        log.info("scheduler lock acquired (%s): starting jobs", self.worker)
        self.scheduler = BackgroundScheduler(timezone=UTC, job_defaults=JOB_DEFAULTS)
        self.scheduler.start()
        try:
            self.sync_rule_jobs()
            add = self.scheduler.add_job
            add(self._guard("deliver", self._deliver), "interval", seconds=self.delivery_interval_s, id="deliver",
                next_run_time=datetime.now(UTC))  # fmt: skip
            add(self._guard("escalate", self._escalate), "interval", seconds=60, id="escalate",
                next_run_time=datetime.now(UTC))  # fmt: skip
            add(self._guard("promotions", self._promotions), "interval", seconds=self.promotions_interval_s,
                id="promotions", next_run_time=datetime.now(UTC))  # fmt: skip
            add(self._guard("rollups", self._rollups), "interval", seconds=60, id="rollups",
                next_run_time=datetime.now(UTC))  # fmt: skip
            add(self._guard("reload-rules", self.sync_rule_jobs), "interval", seconds=self.reload_interval_s,
                id="reload-rules")  # fmt: skip
            add(self._check_leadership, "interval", seconds=10, id="leadership")
            self.stop_event.wait()
        finally:
            log.info("stopping: waiting for running jobs to finish")
            self.scheduler.shutdown(wait=True)
            if self.publisher is not None:
                self.publisher.close()
            self.lock.release()
            log.info("scheduler stopped, lock released")

    def stop(self) -> None:
        self.stop_event.set()
