"""WeCom (企业微信) group robot: one markdown message per notification.

Config: ``url`` (the robot's webhook URL with its ``?key=``) and optionally
``mentioned_mobile_list`` (mobile numbers or ``@all``). Markdown messages cannot mention anyone
by mobile number (only ``text`` messages can), so when the list is set a short text message with
the title follows the markdown one to ping those people.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

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

MARKDOWN_MAX_BYTES = 4096  # the robot API's limit for markdown.content, in UTF-8 bytes
TEXT_MAX_BYTES = 2048  # and for text.content
TRUNCATED = "…"

RATE_LIMITED = 45009  # api freq out of limit: 20 messages a minute per robot
SYSTEM_BUSY = -1


class WeComSettings(NotifierSettings):
    url: str
    mentioned_mobile_list: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value, required_params=("key",))

    @field_validator("mentioned_mobile_list")
    @classmethod
    def _mobiles(cls, value: list[str]) -> list[str]:
        for mobile in value:
            if mobile != "@all" and not mobile.lstrip("+").isdigit():
                raise ValueError("entries must be mobile numbers or '@all'")
        return value


def truncate_utf8(text: str, max_bytes: int, marker: str = TRUNCATED) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, ending in `marker` when cut, never inside a character."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    room = max_bytes - len(marker.encode())
    # errors="ignore" drops the bytes of a character the cut went through, and only those.
    return encoded[:room].decode("utf-8", errors="ignore") + marker


def is_retryable(errcode: int) -> bool:
    # Any other code (93000 invalid key, 40058 bad content, ...) fails the same way on every retry.
    return errcode in (RATE_LIMITED, SYSTEM_BUSY)


@register
class WeComNotifier(Notifier):
    name: ClassVar[str] = "wecom"
    settings_model: ClassVar[type[NotifierSettings]] = WeComSettings
    settings: WeComSettings

    def markdown_body(self, message: Message) -> dict[str, Any]:
        content = truncate_utf8(f"# {one_line(message.title)}\n\n{message.markdown}", MARKDOWN_MAX_BYTES)
        return {"msgtype": "markdown", "markdown": {"content": content}}

    def send(self, message: Message, *, client: httpx.Client) -> DeliveryResult:
        result = self._post(self.markdown_body(message), client)
        if not result.ok or not self.settings.mentioned_mobile_list:
            return result
        mention = {
            "msgtype": "text",
            "text": {
                "content": truncate_utf8(one_line(message.title), TEXT_MAX_BYTES),
                "mentioned_mobile_list": self.settings.mentioned_mobile_list,
            },
        }
        ping = self._post(mention, client)
        if ping.ok:
            return result
        # The message itself arrived: reporting a failure would make the outbox send it again.
        detail = f"{result.detail}; mention failed: {ping.detail}"
        return DeliveryResult(ok=True, status_code=result.status_code, detail=detail, retryable=False)

    def _post(self, body: dict[str, Any], client: httpx.Client) -> DeliveryResult:
        data = json.dumps(body, ensure_ascii=False).encode()
        answer = post(client, self.settings.url, body=data, headers={"Content-Type": "application/json"})
        if isinstance(answer, DeliveryResult):
            return answer
        return robot_result(answer, retryable=is_retryable)
