"""Generic JSON webhook, signed so the receiver can tell StorePulse's requests from forged ones.

Config: ``url``, ``secret`` and optionally ``headers`` (extra request headers, e.g. an API key
the receiver wants). The body is the JSON object ``{"markdown", "payload", "text", "title"}``
(compact, keys sorted, UTF-8 without escapes). Two headers sign it:

- ``X-StorePulse-Timestamp``: the Unix time in seconds when the request was made;
- ``X-StorePulse-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the secret, of
  ``f"{timestamp}."`` followed by the raw body bytes.

A receiver recomputes the signature over the bytes it received (before parsing them), compares
with `hmac.compare_digest` and rejects old timestamps to stop replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import ClassVar

import httpx
from pydantic import Field, field_validator

from adapters.notify.base import (
    DeliveryResult,
    Message,
    Notifier,
    NotifierSettings,
    http_retryable,
    http_url,
    post,
    register,
)

TIMESTAMP_HEADER = "X-StorePulse-Timestamp"
SIGNATURE_HEADER = "X-StorePulse-Signature"
RESERVED_HEADERS = frozenset(name.lower() for name in ("Content-Type", TIMESTAMP_HEADER, SIGNATURE_HEADER))


class WebhookSettings(NotifierSettings):
    url: str
    secret: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        # An extra header must not replace the signature the receiver checks.
        clash = sorted(name for name in value if name.lower() in RESERVED_HEADERS)
        if clash:
            raise ValueError(f"{', '.join(clash)} is set by StorePulse and cannot be overridden")
        return value


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-StorePulse-Signature value for `body` sent at `timestamp` (Unix seconds, as sent)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def encode_body(message: Message) -> bytes:
    """The request body; raises TypeError when the payload holds a value JSON cannot carry."""
    document = {"markdown": message.markdown, "payload": message.payload, "text": message.text, "title": message.title}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


@register
class WebhookNotifier(Notifier):
    name: ClassVar[str] = "webhook"
    settings_model: ClassVar[type[NotifierSettings]] = WebhookSettings
    settings: WebhookSettings

    def send(self, message: Message, *, client: httpx.Client) -> DeliveryResult:
        try:
            body = encode_body(message)
        except (TypeError, ValueError) as exc:
            # A message that cannot be encoded now never will be; fail it instead of the whole delivery pass.
            return DeliveryResult(ok=False, status_code=None, detail=f"payload not JSON: {exc}", retryable=False)
        timestamp = str(int(time.time()))
        headers = {
            **self.settings.headers,
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self.settings.secret, timestamp, body),
        }
        answer = post(client, self.settings.url, body=body, headers=headers)
        if isinstance(answer, DeliveryResult):
            return answer
        status = answer.status_code
        if 200 <= status < 300:
            return DeliveryResult(ok=True, status_code=status, detail=answer.text, retryable=False)
        return DeliveryResult(
            ok=False, status_code=status, detail=f"HTTP {status}: {answer.text}", retryable=http_retryable(status)
        )
