"""Delivering alerts: the outbox of notifications, claimed, sent, retried with backoff, logged.

A delivery pass claims due notifications with one conditional UPDATE (pending and due, or
claimed by a worker whose lease ran out) and commits the claim. Sends run one after another,
outside any transaction; just before each send the worker renews its claim on what it is about
to send (another conditional UPDATE, committed), and drops whatever another worker took over
meanwhile. A claim thus lasts from its renewal through one send, and the lease (120 s) outlasts
one send (at most the 10 s timeout) many times over: two workers never send one notification
twice, however long the whole pass takes. Recording compares the claim (worker and renewal
time) again. Claims a pass did not get to (it was stopped, or failed) are released at its end.
Robots
accept 20 messages a minute: when a channel has more due than its budget allows, they are
merged into digests; when the budget is spent they wait for the minute to roll over.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session

from adapters.notify import DeliveryResult, Message, NotifierConfigError, notifier_for
from ingest.db import session_scope
from ingest.models import Store
from ingest.settings import Settings
from store_rules.alerts.definitions import ChannelDefinition, ChannelSet, active_channels
from store_rules.alerts.models import FAILED, PENDING, SENDING, SENT, Alert, Notification, NotificationAttempt
from store_rules.alerts.service import masked_evidence

log = logging.getLogger(__name__)

SEVERITY = {"low": ("低", "low"), "medium": ("中", "medium"), "high": ("高", "high"), "critical": ("紧急", "critical")}
ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)\}")


@dataclass(frozen=True)
class DeliveryPolicy:
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0
    max_attempts: int = 10
    lease_s: float = 120.0
    send_timeout_s: float = 10.0  # of each HTTP request; a claim must outlast one send
    public_url: str = "http://127.0.0.1:8000"

    def __post_init__(self) -> None:
        if self.lease_s <= self.send_timeout_s:
            raise ValueError(
                f"lease_s: {self.lease_s:g} s must be longer than one send (send_timeout_s {self.send_timeout_s:g} s)"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            backoff_s=settings.notify_backoff_s, backoff_max_s=settings.notify_backoff_max_s,
            max_attempts=settings.notify_max_attempts, lease_s=settings.notify_lease_s,
            public_url=settings.public_url,
        )  # fmt: skip

    def backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.backoff_max_s, self.backoff_s * 2 ** max(attempts - 1, 0)))


@dataclass
class DeliveryReport:
    claimed: int = 0
    sent: int = 0  # notifications delivered (a digest delivers several)
    messages: int = 0  # requests that succeeded
    retried: int = 0
    failed: int = 0
    deferred: int = 0  # waiting for the channel's rate budget
    digests: int = 0
    errors: list[str] = field(default_factory=list)


def resolve_env(value: Any) -> Any:
    """`${NAME}` in a channel's config → the environment variable (secrets stay out of files and the DB)."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise NotifierConfigError(f"config: environment variable {name} is not set")
            return os.environ[name]

        return ENV_REF.sub(lookup, value)
    if isinstance(value, dict):
        return {k: resolve_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v) for v in value]
    return value


# --- messages ------------------------------------------------------------------------------


def _evidence_lines(alert: Alert, limit: int = 10) -> list[str]:
    items = masked_evidence(alert.evidence or [])
    lines = []
    for item in items[:limit]:
        keywords = "、".join(item.get("symptom_keywords") or []) or "—"
        staff = item.get("staff_name") or item.get("staff_id") or "—"
        lines.append(
            f"> {item.get('time', '')[:16].replace('T', ' ')} · {staff} · {item.get('customer_name') or '—'} · "
            f"{keywords} · {item.get('reason') or '—'}"
        )
    if len(items) > limit:
        lines.append(f"> …… 另有 {len(items) - limit} 条 / {len(items) - limit} more")
    return lines


def alert_message(alert: Alert, store_name: str, policy: DeliveryPolicy, reason: str) -> Message:
    sev_zh, sev_en = SEVERITY.get(alert.severity, (alert.severity, alert.severity))
    prefix = "【升级】" if reason == "escalated" else ""
    title = f"{prefix}【{sev_zh}】{store_name} 预警 #{alert.id}"
    link = f"{policy.public_url.rstrip('/')}/alerts/{alert.id}"
    body = [
        f"**{alert.summary.get('zh-CN', '')}**",
        alert.summary.get("en", ""),
        "",
        f"规则 Rule: {alert.rule_id} · 级别 Severity: {sev_zh} / {sev_en} · 窗口 Window: "
        f"{alert.window_start.isoformat()} – {alert.window_end.isoformat()}",
    ]
    evidence = _evidence_lines(alert)
    if evidence:
        body += [
            "",
            f"未通过的医保核验 Failed checks ({len(alert.evidence)}): 时间 · 店员 · 顾客 · 症状 · 原因",
            *evidence,
        ]
    body += ["", f"[确认处理 / Acknowledge]({link})"]
    markdown = "\n".join(body)
    payload = {
        "alert_id": alert.id, "rule_id": alert.rule_id, "severity": alert.severity, "store_id": alert.store_id,
        "region_id": alert.region_id, "status": alert.status, "level": alert.level, "reason": reason,
        "window": [alert.window_start.isoformat(), alert.window_end.isoformat()], "summary": alert.summary,
        "values": alert.values, "evidence": masked_evidence(alert.evidence or []), "url": link,
    }  # fmt: skip
    text = markdown.replace("**", "").replace("> ", "  ")
    return Message(title=title, markdown=markdown, text=text, payload=payload)


def digest_message(alerts: Sequence[tuple[Alert, str, str]], policy: DeliveryPolicy) -> Message:
    """Several alerts in one message, when a robot's per-minute budget would not carry them one by one."""
    title = f"StorePulse 预警汇总 Digest: {len(alerts)} alerts"
    lines = [f"**{len(alerts)} 条预警 / alerts**", ""]
    for alert, store_name, reason in alerts:
        sev_zh, _ = SEVERITY.get(alert.severity, (alert.severity, alert.severity))
        prefix = "【升级】" if reason == "escalated" else ""
        link = f"{policy.public_url.rstrip('/')}/alerts/{alert.id}"
        lines.append(f"- {prefix}【{sev_zh}】#{alert.id} {alert.summary.get('zh-CN', store_name)} [查看]({link})")
    markdown = "\n".join(lines)
    payload = {"digest": [{"alert_id": a.id, "store_id": a.store_id, "summary": a.summary} for a, _, _ in alerts]}
    return Message(title=title, markdown=markdown, text=markdown.replace("**", ""), payload=payload)


# --- the outbox ----------------------------------------------------------------------------


def claim_due(*, session: Session, worker: str, now: datetime, policy: DeliveryPolicy, limit: int = 500) -> list[int]:
    """Claim due notifications for this worker with one conditional UPDATE; returns the claimed ids."""
    stale = now - timedelta(seconds=policy.lease_s)
    due = or_(
        and_(Notification.status == PENDING, Notification.next_attempt_at <= now),
        and_(Notification.status == SENDING, Notification.claimed_at < stale),
    )
    ids = session.scalars(select(Notification.id).where(due).order_by(Notification.id).limit(limit)).all()
    if not ids:
        return []
    claimed = session.scalars(
        update(Notification)
        .where(Notification.id.in_(ids), due)
        .values(status=SENDING, claimed_by=worker, claimed_at=now)
        .returning(Notification.id)
    ).all()
    return sorted(claimed)


@dataclass(frozen=True)
class Claim:
    """What a worker holds: its name and the time it (re)claimed, compared on every later step."""

    worker: str
    at: datetime


def _ours(claim: Claim) -> Any:
    return and_(
        Notification.claimed_by == claim.worker, Notification.claimed_at == claim.at, Notification.status == SENDING
    )


def renew_claim(*, engine: Engine, ids: Sequence[int], claim: Claim) -> tuple[list[int], Claim]:
    """Just before a send: re-take the claim on `ids`, committed; returns the ids still ours and the new claim.

    A notification whose lease ran out and which another worker claimed meanwhile is not ours
    any more and is left out; one that nobody took yet is renewed, and nobody can take it while
    it is being sent (its claim is younger than the lease, which outlasts a send).
    """
    renewed = Claim(claim.worker, datetime.now(UTC))
    with session_scope(engine) as session:
        kept = session.scalars(
            update(Notification)
            .where(Notification.id.in_(list(ids)), _ours(claim))
            .values(claimed_at=renewed.at)
            .returning(Notification.id)
        ).all()
    return sorted(kept), renewed


def release_claim(*, engine: Engine, ids: Sequence[int], claim: Claim) -> int:
    """Give back notifications claimed but not sent, so another worker sends them without waiting for the lease."""
    with session_scope(engine) as session:
        result = session.execute(
            update(Notification)
            .where(Notification.id.in_(list(ids)), _ours(claim))
            .values(status=PENDING, claimed_by=None, claimed_at=None)
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _sent_in_last_minute(session: Session, channel_id: str, now: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(NotificationAttempt)
            .where(NotificationAttempt.channel_id == channel_id, NotificationAttempt.at > now - timedelta(seconds=60))
        )
        or 0
    )


def _record(
    session: Session,
    channel: str,
    notification_ids: list[int],
    result: DeliveryResult,
    claim: Claim,
    at: datetime,
    duration_ms: int,
    policy: DeliveryPolicy,
    report: DeliveryReport,
    digest_id: str | None,
) -> None:
    session.add(
        NotificationAttempt(
            channel_id=channel, notification_ids=notification_ids, at=at, ok=result.ok,
            status_code=result.status_code, detail=result.detail[:500], duration_ms=duration_ms, worker=claim.worker,
        )
    )  # fmt: skip
    for notification in session.scalars(
        select(Notification).where(Notification.id.in_(notification_ids), _ours(claim))
    ):
        notification.attempts += 1
        if result.ok:
            notification.status, notification.sent_at, notification.digest_id = SENT, at, digest_id
            notification.last_error = None
            report.sent += 1
        elif result.retryable and notification.attempts < policy.max_attempts:
            notification.status = PENDING
            notification.next_attempt_at = at + policy.backoff(notification.attempts)
            notification.last_error = result.detail[:500]
            report.retried += 1
        else:
            notification.status, notification.last_error = FAILED, result.detail[:500]
            report.failed += 1
            log.error("notification %s on %s failed for good: %s", notification.id, channel, result.detail)


def _send(channel: ChannelDefinition, message: Message, client: httpx.Client) -> DeliveryResult:
    try:
        notifier = notifier_for(channel.adapter, resolve_env(channel.config))
    except NotifierConfigError as exc:
        return DeliveryResult(ok=False, status_code=None, detail=f"channel {channel.id}: {exc}", retryable=False)
    return notifier.send(message, client=client)


def deliver_due(
    *,
    engine: Engine,
    worker: str | None = None,
    policy: DeliveryPolicy | None = None,
    client: httpx.Client | None = None,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> DeliveryReport:
    """One delivery pass: claim, send (one by one, or as digests past a channel's budget), record.

    When `stop` is set (the scheduler is shutting down) the pass ends after the send in flight
    and gives back what it did not send, for the next scheduler to take over at once.
    """
    worker = worker or f"delivery-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    policy = policy or DeliveryPolicy()
    report = DeliveryReport()
    now = now or datetime.now(UTC)
    with session_scope(engine) as session:
        claimed = claim_due(session=session, worker=worker, now=now, policy=policy)
        channels = active_channels(session=session)
    report.claimed = len(claimed)
    if not claimed:
        return report
    claim = Claim(worker, now)
    own_client = client is None
    client = client or httpx.Client(timeout=policy.send_timeout_s)
    try:
        with session_scope(engine) as session:
            rows = session.execute(
                select(Notification, Alert, Store.name_zh)
                .join(Alert, Alert.id == Notification.alert_id)
                .join(Store, Store.store_id == Alert.store_id)
                .where(Notification.id.in_(claimed))
                .order_by(Notification.id)
            ).all()
        by_channel: dict[str, list[tuple[Notification, Alert, str]]] = defaultdict(list)
        for notification, alert, store_name in rows:
            by_channel[notification.channel_id].append((notification, alert, store_name))
        for channel_id, items in by_channel.items():
            if stop is not None and stop.is_set():
                break
            _deliver_channel(engine, channels, channel_id, items, claim, policy, client, report, stop)
    finally:
        if own_client:
            client.close()
        # Sent ones carry a renewed claim (or are no longer sending): only the untouched are given back.
        released = release_claim(engine=engine, ids=claimed, claim=claim)
        if released:
            log.info("delivery %s: %d notification(s) given back unsent", worker, released)
    return report


def _deliver_channel(
    engine: Engine,
    channels: ChannelSet,
    channel_id: str,
    items: list[tuple[Notification, Alert, str]],
    claim: Claim,
    policy: DeliveryPolicy,
    client: httpx.Client,
    report: DeliveryReport,
    stop: threading.Event | None = None,
) -> None:
    channel = channels.get(channel_id)
    ids = [n.id for n, _, _ in items]
    if channel is None:
        result = DeliveryResult(False, None, f"channel {channel_id}: not in the channels in force", retryable=False)
        with session_scope(engine) as session:
            _record(session, channel_id, ids, result, claim, datetime.now(UTC), 0, policy, report, None)
        return
    with session_scope(engine) as session:
        budget = channel.rate_limit_per_minute - _sent_in_last_minute(session, channel_id, datetime.now(UTC))
        if budget <= 0:
            # Released for the next minute; the claim's conditional UPDATE keeps it ours until then.
            session.execute(
                update(Notification)
                .where(Notification.id.in_(ids), _ours(claim))
                .values(status=PENDING, next_attempt_at=datetime.now(UTC) + timedelta(seconds=60))
            )
            report.deferred += len(ids)
            return
    if len(items) <= budget:
        groups = [[item] for item in items]
    else:
        # As few digests as the budget needs; a long one is cut by the robot adapter's size limit.
        size = max(math.ceil(len(items) / budget), 2)
        groups = [items[i : i + size] for i in range(0, len(items), size)]
    for planned in groups:
        if stop is not None and stop.is_set():
            return
        kept, sending = renew_claim(engine=engine, ids=[n.id for n, _, _ in planned], claim=claim)
        group = [item for item in planned if item[0].id in kept]
        if not group:
            continue  # another worker took these over after our lease ran out; it sends them
        if len(group) == 1:
            notification, alert, store_name = group[0]
            message, digest_id = alert_message(alert, store_name, policy, notification.reason), None
        else:
            message = digest_message([(a, s, n.reason) for n, a, s in group], policy)
            digest_id = uuid.uuid4().hex
            report.digests += 1
        started = time.monotonic()
        at = datetime.now(UTC)
        result = _send(channel, message, client)
        duration_ms = int((time.monotonic() - started) * 1000)
        if result.ok:
            report.messages += 1
        else:
            report.errors.append(f"{channel_id}: {result.detail}")
            log.warning("delivery to %s failed (%s): %s", channel_id, result.status_code, result.detail)
        with session_scope(engine) as session:
            _record(
                session,
                channel_id,
                [n.id for n, _, _ in group],
                result,
                sending,
                at,
                duration_ms,
                policy,
                report,
                digest_id,
            )
