"""What the ingest service does with newly accepted events, inside the transaction that stores them.

The rule side keeps the rollups and the counter-flow compliance up to date from each accepted
batch. These handlers are part of the ingest service itself: every path that stores events (HTTP,
MQTT worker, simulator, importers, gateway, dead-letter replay) runs them through
`ingest.service.ingest_inbound`, with nothing to install and nothing to forget. The event store
names them instead of importing them at module level, because the rule side builds on the event
store (its POS path stores steps through the ingest service).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import cache

from sqlalchemy.orm import Session

from ingest.contract import Event

AcceptedEventsHandler = Callable[[Session, Sequence[Event]], None]

# Run in this order, in the accepting transaction: a failure rolls the whole batch back.
ACCEPTED_EVENT_HANDLERS: tuple[str, ...] = (
    "store_rules.rollups:mark_dirty",
    "store_rules.compliance:check_accepted_events",
)


@cache
def accepted_event_handlers() -> tuple[AcceptedEventsHandler, ...]:
    handlers = []
    for reference in ACCEPTED_EVENT_HANDLERS:
        module_name, _, function_name = reference.partition(":")
        handlers.append(getattr(importlib.import_module(module_name), function_name))
    return tuple(handlers)


def run_accepted_hooks(session: Session, events: Sequence[Event]) -> None:
    if events:
        for handler in accepted_event_handlers():
            handler(session, events)
