"""Promotion sets over MQTT: retained, QoS 1, on `{prefix}/{store_id}/promotions`.

One long-lived paho client per process (the API's, the scheduler's). Retained messages make a
till that was offline get the newest set as soon as it subscribes; the till answers on
`{prefix}/{store_id}/pos/{terminal_id}/ack`, which the ingest worker records.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from adapters.publish.base import PromotionPublisher, PublishError, register
from ingest.settings import Settings

log = logging.getLogger(__name__)


def promotions_topic(prefix: str, store_id: str) -> str:
    return f"{prefix}/{store_id}/promotions"


@register
class MqttPublisher(PromotionPublisher):
    name = "mqtt"

    def __init__(self, settings: Settings, *, connect_timeout_s: float = 5.0, publish_timeout_s: float = 5.0) -> None:
        if not settings.mqtt_url:
            raise ValueError("mqtt_url: the MQTT promotion publisher needs a broker")
        self.prefix = settings.mqtt_topic_prefix
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.connected = threading.Event()
        url = urlsplit(settings.mqtt_url)
        # A clean session of its own: publishing needs no subscriptions to survive a restart.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{settings.mqtt_client_id}-publisher-{id(self):x}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        if url.username:
            self.client.username_pw_set(unquote(url.username), unquote(url.password) if url.password else None)
        if url.scheme in ("mqtts", "ssl"):
            self.client.tls_set()
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the promotion publisher: %s", reason)
            return
        self.connected.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self.connected.clear()
        log.warning("promotion publisher disconnected (%s); paho reconnects", reason)

    def publish(self, store_id: str, promotion_set: dict[str, Any]) -> None:
        if not self.connected.wait(self.connect_timeout_s):
            raise PublishError("broker not connected")
        info = self.client.publish(
            promotions_topic(self.prefix, store_id), orjson.dumps(promotion_set), qos=1, retain=True
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish refused locally: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(self.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(str(exc)) from None
        if not info.is_published():
            raise PublishError(f"no PUBACK within {self.publish_timeout_s:g} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
