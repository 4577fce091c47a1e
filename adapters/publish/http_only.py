"""For chains whose tills have no MQTT: nothing is pushed, tills read GET /api/v1/stores/{id}/promotions."""

from __future__ import annotations

from typing import Any

from adapters.publish.base import PromotionPublisher, register
from ingest.settings import Settings


@register
class HttpOnlyPublisher(PromotionPublisher):
    name = "http_only"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def publish(self, store_id: str, promotion_set: dict[str, Any]) -> None:
        # The HTTP endpoint serves the newest stored set: marking it published is all there is to do.
        return None
