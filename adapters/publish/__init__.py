"""Promotion publishing to tills: one adapter per transport, found by name (`publisher_for`)."""

from __future__ import annotations

from adapters.publish import http_only, mqtt
from adapters.publish.base import PUBLISHERS, PromotionPublisher, PublishError, publisher_for

__all__ = ["PUBLISHERS", "PromotionPublisher", "PublishError", "http_only", "mqtt", "publisher_for"]
