"""Decisions on promotions, told to whoever cares, inside the deciding transaction.

The promotion side knows nothing of alerts. When a draft is approved, rejected or expires it
emits a `PromotionDecided`; the alert side subscribes (store_rules.alerts.service) and closes
the alert that drafted it. So the dependency runs one way only: alerts draft promotions, and
promotions never import alerts. Handlers run in the same session, so a failing handler rolls
the decision back with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionDecided:
    promotion_id: str
    store_id: str
    outcome: str  # approved / rejected / expired
    alert_id: int | None  # the alert whose rule drafted it, if any
    note: str  # what happened, in words (kept on the alert's transition)
    at: datetime


PromotionDecidedHandler = Callable[[Session, PromotionDecided], None]
_handlers: dict[str, PromotionDecidedHandler] = {}


def on_promotion_decided(name: str, handler: PromotionDecidedHandler) -> None:
    """Subscribe (or replace) a handler by name, so subscribing twice is harmless."""
    _handlers[name] = handler


def promotion_decided(session: Session, event: PromotionDecided) -> None:
    if event.alert_id is not None and not _handlers:
        # A process that decides drafted promotions without the alert side would leave their alerts open.
        log.error("promotion %s %s: nobody handles decisions, alert %s stays open",
                  event.promotion_id, event.outcome, event.alert_id)  # fmt: skip
    for handler in _handlers.values():
        handler(session, event)
