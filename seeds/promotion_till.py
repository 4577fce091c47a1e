"""A till's promotion side over MQTT: take the store's retained set, apply it, acknowledge the version.

What a real till does (CONTRACT.md): subscribe to `{prefix}/{store_id}/promotions` (QoS 1;
the broker hands over the retained set at once, also to a till that was offline when it was
published), apply a version newer than the one it has, then publish
`{"promotions_version": N}` on `{prefix}/{store_id}/pos/{terminal_id}/ack`. Used by the tests,
the promotion benchmark and the demo.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


@dataclass
class PromotionTill:
    store_id: str
    terminal_id: str
    mqtt_url: str
    prefix: str = "storepulse/v1"
    on_applied: Callable[[PromotionTill, int], None] | None = None
    version: int = 0  # the version applied
    promotions: list[dict[str, Any]] = field(default_factory=list)
    applied_at: dict[int, float] = field(default_factory=dict)  # version → time.monotonic() when acknowledged
    subscribed: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    client: mqtt.Client | None = None

    @property
    def topic(self) -> str:
        return f"{self.prefix}/{self.store_id}/promotions"

    @property
    def ack_topic(self) -> str:
        return f"{self.prefix}/{self.store_id}/pos/{self.terminal_id}/ack"

    def connect(self, timeout: float = 10) -> PromotionTill:
        url = urlsplit(self.mqtt_url)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"till-{self.store_id}-{self.terminal_id}-{id(self):x}",
            protocol=mqtt.MQTTv311,
        )  # fmt: skip
        if url.username:
            client.username_pw_set(unquote(url.username), unquote(url.password) if url.password else None)
        client.on_connect = lambda c, *_a: c.subscribe(self.topic, qos=1)
        client.on_subscribe = lambda *_a: self.subscribed.set()
        client.on_message = self._on_message
        client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30)
        client.loop_start()
        self.client = client
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"till {self.store_id}/{self.terminal_id}: no SUBACK within {timeout} s")
        return self

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = orjson.loads(message.payload)
            version = int(body["version"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("till %s/%s: unreadable promotion set on %s", self.store_id, self.terminal_id, message.topic)
            return
        if version <= self.version:
            return  # an older set arriving late never replaces a newer one
        with self._changed:
            self.version, self.promotions = version, list(body.get("promotions", []))
            client.publish(self.ack_topic, orjson.dumps({"promotions_version": version}), qos=1)
            self.applied_at[version] = time.monotonic()
            self._changed.notify_all()
        if self.on_applied is not None:
            self.on_applied(self, version)

    def wait_for(self, version: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.version >= version, timeout)

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
