"""The notifier contract: a message, the result of one delivery attempt, the adapter base class, the registry.

An adapter turns a `Message` into one provider request and the provider's answer into a
`DeliveryResult`. It never raises for network or provider errors: the caller (the delivery
outbox) decides from `ok` and `retryable` whether to record, retry with backoff or give up.
Configuration errors surface earlier, when the adapter is built, as `NotifierConfigError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

DETAIL_MAX = 500

N = TypeVar("N", bound="type[Notifier]")
S = TypeVar("S", bound="NotifierSettings")


@dataclass(frozen=True)
class Message:
    """One notification, rendered once per body format so every adapter picks the one it sends."""

    title: str  # one line, e.g. "【高】温州鹿城店 医保核验通过率 60.0 %"
    markdown: str  # body in the markdown subset WeCom/DingTalk robots render
    text: str  # plain-text body (e-mail)
    payload: dict[str, Any]  # structured form for the generic JSON webhook


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one delivery attempt; `detail` is clipped to 500 characters on creation."""

    ok: bool
    status_code: int | None  # HTTP status (or SMTP reply code), None when no answer
    detail: str  # provider answer or error text
    retryable: bool  # False for errors a retry cannot fix (bad config, 4xx other than 429, bad robot key)

    def __post_init__(self) -> None:
        # Enforced here, not left to each adapter: the outbox stores the detail in a bounded column.
        if len(self.detail) > DETAIL_MAX:
            object.__setattr__(self, "detail", self.detail[: DETAIL_MAX - 1] + "…")


class NotifierConfigError(ValueError):
    """A channel's configuration is unusable; the message names the field and the reason."""


class NotifierSettings(BaseModel):
    """Base of the per-adapter config models: unknown keys are errors, values are immutable."""

    # Whitespace is stripped because values often come from environment variables with a stray newline.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Notifier(ABC):
    """A delivery channel. Subclasses set `name` and `settings_model` and narrow `settings`."""

    name: ClassVar[str]
    settings_model: ClassVar[type[NotifierSettings]]
    settings: NotifierSettings

    def __init__(self, config: dict[str, Any]) -> None:
        self.settings = parse_settings(self.settings_model, config)

    @abstractmethod
    def send(self, message: Message, *, client: httpx.Client) -> DeliveryResult:
        """Deliver `message` once; network and provider errors come back as ok=False, never as exceptions."""

    def __repr__(self) -> str:
        # Never the settings: they hold robot keys, secrets and passwords.
        return f"<{type(self).__name__} {self.name}>"


NOTIFIERS: dict[str, type[Notifier]] = {}


def register(cls: N) -> N:
    """Class decorator: make the adapter reachable by its `name` through `notifier_for`."""
    NOTIFIERS[cls.name] = cls
    return cls


def notifier_for(adapter: str, config: dict[str, Any]) -> Notifier:
    """The adapter called `adapter`, configured with `config`; NotifierConfigError when either is wrong."""
    cls = NOTIFIERS.get(adapter)
    if cls is None:
        known = ", ".join(sorted(NOTIFIERS))
        raise NotifierConfigError(f"adapter: unknown notifier {adapter!r} (known: {known})")
    return cls(config)


def parse_settings(model: type[S], config: Any) -> S:
    """Validate `config` with `model`; errors name each field and reason, never the value (it may be a secret)."""
    if not isinstance(config, dict):
        raise NotifierConfigError(f"config: must be a mapping, not {type(config).__name__}")
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise NotifierConfigError("; ".join(_describe(model, error) for error in exc.errors())) from None


def _describe(model: type[NotifierSettings], error: ErrorDetails) -> str:
    reason = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return reason  # a check across fields, whose message names them itself
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown field (known: {', '.join(model.model_fields)})"
    if error["type"] == "missing":
        return f"{field}: required"
    return f"{field}: {reason[:1].lower()}{reason[1:]}"


def http_url(value: str, *, required_params: Iterable[str] = ()) -> str:
    """A pydantic field check: an absolute http(s) URL carrying `required_params` in its query."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    params = parse_qs(parts.query)
    for param in required_params:
        if not params.get(param, [""])[0]:
            raise ValueError(f"must carry the {param}= parameter the provider issued")
    return value


def one_line(title: str) -> str:
    """Titles go into headings and mail subjects, where a line break would end them early."""
    return " ".join(title.split())


def post(client: httpx.Client, url: str, *, body: bytes, headers: dict[str, str]) -> httpx.Response | DeliveryResult:
    """POST `body`; a transport failure becomes a retryable DeliveryResult instead of an exception."""
    try:
        return client.post(url, content=body, headers=headers)
    except httpx.InvalidURL as exc:
        return DeliveryResult(ok=False, status_code=None, detail=f"invalid URL: {exc}", retryable=False)
    except httpx.HTTPError as exc:
        # The exception text never holds the URL (and so never the robot key), only the cause.
        return DeliveryResult(ok=False, status_code=None, detail=_error_text(exc), retryable=True)


def http_retryable(status_code: int) -> bool:
    """Rate limiting and server errors pass; any other 4xx needs a change on our side."""
    return status_code == 429 or status_code >= 500


def robot_result(response: httpx.Response, *, retryable: Callable[[int], bool]) -> DeliveryResult:
    """The answer of a WeCom or DingTalk robot: success is HTTP 200 with `errcode` 0 in the JSON body."""
    status, text = response.status_code, response.text
    if status != 200:
        return DeliveryResult(
            ok=False, status_code=status, detail=f"HTTP {status}: {text}", retryable=http_retryable(status)
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    errcode = answer.get("errcode") if isinstance(answer, dict) else None
    if not isinstance(errcode, int):
        # A 200 without the robot's JSON usually comes from a proxy or captive portal in between.
        return DeliveryResult(ok=False, status_code=status, detail=f"unexpected answer: {text}", retryable=True)
    if errcode == 0:
        return DeliveryResult(ok=True, status_code=status, detail=text, retryable=False)
    return DeliveryResult(ok=False, status_code=status, detail=text, retryable=retryable(errcode))


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
