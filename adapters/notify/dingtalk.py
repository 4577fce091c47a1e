"""DingTalk (钉钉) custom group robot with signing (加签): one markdown message per notification.

Config: ``url`` (the robot's webhook URL with its ``access_token=``) and ``secret`` (the
``SEC…`` signing secret). Every request carries the current time in milliseconds and its
HMAC-SHA256 signature as ``timestamp`` and ``sign`` query parameters; DingTalk rejects a
signature older than an hour, so it is computed per send and never cached.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, ClassVar
from urllib.parse import quote_plus

import httpx
from pydantic import Field, field_validator

from adapters.notify.base import (
    DeliveryResult,
    Message,
    Notifier,
    NotifierSettings,
    http_url,
    one_line,
    post,
    register,
    robot_result,
)

SEND_TOO_FAST = 130101  # more than 20 messages a minute
SYSTEM_BUSY = -1
SECURITY_CHECK_FAILED = 310000  # bad signature, missing keyword or IP not allowed: needs a config change


class DingTalkSettings(NotifierSettings):
    url: str
    secret: str = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value, required_params=("access_token",))


def sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's signature of `timestamp_ms`: base64 of HMAC-SHA256 over "timestamp\\nsecret", not URL-quoted."""
    string_to_sign = f"{timestamp_ms}\n{secret}"
    digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def is_retryable(errcode: int) -> bool:
    # 310000 and the token errors (300001, ...) fail the same way on every retry.
    return errcode in (SEND_TOO_FAST, SYSTEM_BUSY)


@register
class DingTalkNotifier(Notifier):
    name: ClassVar[str] = "dingtalk"
    settings_model: ClassVar[type[NotifierSettings]] = DingTalkSettings
    settings: DingTalkSettings

    def markdown_body(self, message: Message) -> dict[str, Any]:
        title = one_line(message.title)
        # `title` is what the chat list and the push notification show; `text` is the message itself.
        return {"msgtype": "markdown", "markdown": {"title": title, "text": f"### {title}\n\n{message.markdown}"}}

    def signed_url(self, timestamp_ms: int) -> str:
        signature = quote_plus(sign(self.settings.secret, timestamp_ms))
        return f"{self.settings.url}&timestamp={timestamp_ms}&sign={signature}"

    def send(self, message: Message, *, client: httpx.Client) -> DeliveryResult:
        body = json.dumps(self.markdown_body(message), ensure_ascii=False).encode()
        url = self.signed_url(int(time.time() * 1000))
        answer = post(client, url, body=body, headers={"Content-Type": "application/json"})
        if isinstance(answer, DeliveryResult):
            return answer
        return robot_result(answer, retryable=is_retryable)
