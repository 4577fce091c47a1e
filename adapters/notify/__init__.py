"""Outbound notifications: one adapter per channel type (WeCom, DingTalk, generic webhook, e-mail), found by name.

`notifier_for(adapter, config)` builds a configured adapter; `send(message, client=...)` makes one
delivery attempt and reports it as a `DeliveryResult` (the caller owns retries and backoff).
"""

from __future__ import annotations

from adapters.notify import dingtalk, email, webhook, wecom
from adapters.notify.base import NOTIFIERS, DeliveryResult, Message, Notifier, NotifierConfigError, notifier_for

__all__ = [
    "NOTIFIERS",
    "DeliveryResult",
    "Message",
    "Notifier",
    "NotifierConfigError",
    "dingtalk",
    "email",
    "notifier_for",
    "webhook",
    "wecom",
]
