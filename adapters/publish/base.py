"""The promotion publisher contract: send a store's promotion set to its tills; the registry by name.

A publisher gets the set as a JSON-ready dict and either delivers it (the broker took it) or
raises `PublishError`; the caller keeps the set unpublished and retries later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from ingest.settings import Settings

P = TypeVar("P", bound="type[PromotionPublisher]")


class PublishError(RuntimeError):
    """The set did not reach the broker; the message says why."""


class PromotionPublisher(ABC):
    name: ClassVar[str]

    @abstractmethod
    def publish(self, store_id: str, promotion_set: dict[str, Any]) -> None:
        """Deliver the set (retained, so a till that connects later still gets it) or raise PublishError."""

    def close(self) -> None:  # noqa: B027 - optional for publishers that hold nothing open
        """Release connections; the publisher is not used afterwards."""


PUBLISHERS: dict[str, type[PromotionPublisher]] = {}


def register(cls: P) -> P:
    PUBLISHERS[cls.name] = cls
    return cls


def publisher_for(name: str, settings: Settings) -> PromotionPublisher:
    """A publisher by name; "auto" is MQTT when a broker is configured, HTTP-only otherwise."""
    if name == "auto":
        name = "mqtt" if settings.mqtt_url else "http_only"
    factory: Callable[[Settings], PromotionPublisher] | None = PUBLISHERS.get(name)
    if factory is None:
        raise ValueError(f"promotion_publisher: unknown publisher {name!r} (one of auto, {', '.join(PUBLISHERS)})")
    return factory(settings)
