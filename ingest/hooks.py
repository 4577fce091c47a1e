"""Hooks run on newly accepted events, inside the transaction that stores them.

The event store knows nothing of rules; the rule side (store_rules) installs hooks here so
that every ingest path (HTTP, MQTT worker, simulator, importers) triggers the same checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session

from ingest.contract import Event

AcceptedEventsHook = Callable[[Session, Sequence[Event]], None]
_hooks: dict[str, AcceptedEventsHook] = {}


def register_accepted_hook(name: str, hook: AcceptedEventsHook) -> None:
    """Install (or replace) a hook by name, so installing twice is harmless."""
    _hooks[name] = hook


def run_accepted_hooks(session: Session, events: Sequence[Event]) -> None:
    if events:
        for hook in _hooks.values():
            hook(session, events)
