"""The notification adapters against real local servers: a recording HTTP server and an aiosmtpd SMTP server.

Nothing is mocked: every adapter makes real requests over loopback, and what the robots and
receivers would check (body shape, signatures, UTF-8 text) is recomputed here independently of
the adapters' own code.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from adapters.notify import NOTIFIERS, DeliveryResult, Message, NotifierConfigError, notifier_for
from adapters.notify.dingtalk import DingTalkNotifier, sign
from adapters.notify.wecom import WeComNotifier
from tests.conftest import free_port
from tests.recorder import RecordingServer

TITLE = "【高】温州鹿城店 医保核验通过率 60.0 %"
MARKDOWN = "**医保核验通过率 60.0 %**\n> 店员 张** · 14:05 · 未通过\n\n[确认处理 / Acknowledge](http://127.0.0.1:8000/alerts/7)"
TEXT = "医保核验通过率 60.0 %\n店员 张** · 14:05 · 未通过\n确认处理 / Acknowledge: http://127.0.0.1:8000/alerts/7"
PAYLOAD: dict[str, Any] = {
    "alert_id": 7,
    "store_id": "S001",
    "summary": {"zh-CN": "医保核验通过率 60.0 %", "en": "60.0 %"},
}
DINGTALK_SECRET = "SEC0123456789abcdef-测试"
WEBHOOK_SECRET = "webhook-secret-密钥"


def message(markdown: str = MARKDOWN, title: str = TITLE) -> Message:
    return Message(title=title, markdown=markdown, text=TEXT, payload=PAYLOAD)


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    return free_port()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as recording:
        yield recording


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as http:
        yield http


def wecom_url(base: str) -> str:
    return f"{base}/cgi-bin/webhook/send?key=robot-key-1"


def dingtalk_url(base: str) -> str:
    return f"{base}/robot/send?access_token=token-1"


# --- WeCom ----------------------------------------------------------------------------------


def test_wecom_posts_markdown_with_the_title_as_heading(server: RecordingServer, client: httpx.Client) -> None:
    result = notifier_for("wecom", {"url": wecom_url(server.url)}).send(message(), client=client)

    assert result == DeliveryResult(ok=True, status_code=200, detail=result.detail, retryable=False)
    (request,) = server.requests
    assert (request.method, request.path, request.query) == ("POST", "/cgi-bin/webhook/send", {"key": "robot-key-1"})
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {"msgtype": "markdown", "markdown": {"content": f"# {TITLE}\n\n{MARKDOWN}"}}


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_wecom_cuts_long_chinese_to_4096_bytes_on_a_character_boundary(
    server: RecordingServer, client: httpx.Client, padding: int
) -> None:
    # 3-byte characters behind 0, 1 or 2 ASCII bytes: one of the three cuts falls inside a character.
    markdown = "x" * padding + "医保核验未通过，请店长当日复核。" * 400
    result = notifier_for("wecom", {"url": wecom_url(server.url)}).send(message(markdown), client=client)

    assert result.ok
    content = server.requests[0].json()["markdown"]["content"]
    assert 4096 - 6 < len(content.encode("utf-8")) <= 4096
    assert content.endswith("…")
    assert f"# {TITLE}\n\n{markdown}".startswith(content.removesuffix("…"))


def test_wecom_pings_mentioned_mobiles_with_a_text_message(server: RecordingServer, client: httpx.Client) -> None:
    config = {"url": wecom_url(server.url), "mentioned_mobile_list": ["13800001111", "@all"]}
    result = notifier_for("wecom", config).send(message(), client=client)

    assert result.ok
    markdown, mention = (request.json() for request in server.requests)
    assert markdown["msgtype"] == "markdown"
    assert mention == {"msgtype": "text", "text": {"content": TITLE, "mentioned_mobile_list": ["13800001111", "@all"]}}


@pytest.mark.parametrize(
    ("status", "answer", "retryable"),
    [
        (200, {"errcode": 45009, "errmsg": "api freq out of limit"}, True),
        (200, {"errcode": -1, "errmsg": "system busy"}, True),
        (200, {"errcode": 93000, "errmsg": "invalid webhook url"}, False),
        (200, {"errcode": 40058, "errmsg": "markdown.content exceed max length"}, False),
        (500, {"errmsg": "internal error"}, True),
        (502, None, True),
        (404, {"errmsg": "not found"}, False),
    ],
)
def test_wecom_failures_say_whether_a_retry_can_help(
    server: RecordingServer, client: httpx.Client, status: int, answer: dict[str, Any] | None, retryable: bool
) -> None:
    server.respond(status, answer)
    result = notifier_for("wecom", {"url": wecom_url(server.url)}).send(message(), client=client)

    assert (result.ok, result.status_code, result.retryable) == (False, status, retryable)
    if answer and "errmsg" in answer:
        assert answer["errmsg"] in result.detail


def test_wecom_answer_without_errcode_is_no_success(server: RecordingServer, client: httpx.Client) -> None:
    server.respond(200, {"message": "captive portal"})
    result = notifier_for("wecom", {"url": wecom_url(server.url)}).send(message(), client=client)

    assert (result.ok, result.retryable) == (False, True)


def test_wecom_connection_refused_is_retryable(client: httpx.Client) -> None:
    url = wecom_url(f"http://127.0.0.1:{closed_port()}")
    result = notifier_for("wecom", {"url": url}).send(message(), client=client)

    assert (result.ok, result.status_code, result.retryable) == (False, None, True)
    assert "robot-key-1" not in result.detail


def test_wecom_long_provider_answer_is_clipped_to_500_chars(server: RecordingServer, client: httpx.Client) -> None:
    server.respond(200, {"errcode": 93000, "errmsg": "无效" * 2000})
    result = notifier_for("wecom", {"url": wecom_url(server.url)}).send(message(), client=client)

    assert not result.ok
    assert len(result.detail) <= 500


# --- DingTalk -------------------------------------------------------------------------------


def independent_dingtalk_sign(secret: str, timestamp: str) -> str:
    """DingTalk's documented algorithm, written out again so the adapter's code is not checked against itself."""
    mac = hmac.new(secret.encode("utf-8"), (timestamp + "\n" + secret).encode("utf-8"), digestmod=hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


def test_dingtalk_signs_each_request_with_the_current_time(server: RecordingServer, client: httpx.Client) -> None:
    config = {"url": dingtalk_url(server.url), "secret": DINGTALK_SECRET}
    result = notifier_for("dingtalk", config).send(message(), client=client)

    assert result.ok
    (request,) = server.requests
    assert request.path == "/robot/send"
    assert set(request.query) == {"access_token", "timestamp", "sign"}
    assert request.query["access_token"] == "token-1"
    timestamp = request.query["timestamp"]
    assert abs(int(timestamp) - time.time() * 1000) < 5_000
    # The recorder URL-decodes the query: a "+" sent unescaped would arrive as a space and fail here.
    assert hmac.compare_digest(request.query["sign"], independent_dingtalk_sign(DINGTALK_SECRET, timestamp))
    assert request.json() == {
        "msgtype": "markdown",
        "markdown": {"title": TITLE, "text": f"### {TITLE}\n\n{MARKDOWN}"},
    }


def test_dingtalk_sign_escapes_plus_slash_and_equals_in_the_url() -> None:
    timestamp = next(
        t for t in range(1_764_000_000_000, 1_764_000_010_000) if "+" in independent_dingtalk_sign("s", str(t))
    )
    assert sign("s", timestamp) == independent_dingtalk_sign("s", str(timestamp))

    notifier = notifier_for("dingtalk", {"url": "https://oapi.dingtalk.com/robot/send?access_token=t", "secret": "s"})
    assert isinstance(notifier, DingTalkNotifier)
    query = urlsplit(notifier.signed_url(timestamp)).query
    assert "+" not in query
    assert parse_qs(query)["sign"] == [independent_dingtalk_sign("s", str(timestamp))]


@pytest.mark.parametrize(
    ("answer", "ok", "retryable"),
    [
        ({"errcode": 0, "errmsg": "ok"}, True, False),
        ({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}, False, True),
        ({"errcode": 310000, "errmsg": "sign not match"}, False, False),
        ({"errcode": 300001, "errmsg": "token is not exist"}, False, False),
    ],
)
def test_dingtalk_errcodes(
    server: RecordingServer, client: httpx.Client, answer: dict[str, Any], ok: bool, retryable: bool
) -> None:
    server.respond(200, answer)
    config = {"url": dingtalk_url(server.url), "secret": DINGTALK_SECRET}
    result = notifier_for("dingtalk", config).send(message(), client=client)

    assert (result.ok, result.status_code, result.retryable) == (ok, 200, retryable)
    assert answer["errmsg"] in result.detail


# --- generic webhook ------------------------------------------------------------------------


def test_webhook_body_and_signature_verify_independently(server: RecordingServer, client: httpx.Client) -> None:
    config = {"url": f"{server.url}/hooks/storepulse", "secret": WEBHOOK_SECRET, "headers": {"X-Api-Key": "k-1"}}
    result = notifier_for("webhook", config).send(message(), client=client)

    assert (result.ok, result.status_code) == (True, 200)
    (request,) = server.requests
    assert request.path == "/hooks/storepulse"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-api-key"] == "k-1"
    timestamp = request.headers["x-storepulse-timestamp"]
    assert abs(int(timestamp) - time.time()) < 5
    expected = hmac.new(WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256)
    assert hmac.compare_digest(request.headers["x-storepulse-signature"], "sha256=" + expected.hexdigest())
    assert request.json() == {"title": TITLE, "markdown": MARKDOWN, "text": TEXT, "payload": PAYLOAD}
    # Compact UTF-8 with sorted keys: the exact bytes a receiver hashes, Chinese not \\u-escaped.
    assert request.body.startswith(b'{"markdown":"**') and "温州鹿城店".encode() in request.body


def test_webhook_signature_does_not_match_other_bytes(server: RecordingServer, client: httpx.Client) -> None:
    config = {"url": f"{server.url}/hook", "secret": WEBHOOK_SECRET}
    notifier_for("webhook", config).send(message(), client=client)

    (request,) = server.requests
    timestamp = request.headers["x-storepulse-timestamp"]
    reencoded = json.dumps(request.json()).encode()  # ASCII-escaped: different bytes, same JSON
    forged = hmac.new(WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + reencoded, hashlib.sha256)
    assert request.headers["x-storepulse-signature"] != "sha256=" + forged.hexdigest()


@pytest.mark.parametrize(
    ("status", "ok", "retryable"),
    [
        (200, True, False),
        (202, True, False),
        (400, False, False),
        (404, False, False),
        (429, False, True),
        (503, False, True),
    ],
)
def test_webhook_status_codes(
    server: RecordingServer, client: httpx.Client, status: int, ok: bool, retryable: bool
) -> None:
    server.respond(status, {"error": "from receiver"} if status >= 300 else {"received": True})
    result = notifier_for("webhook", {"url": f"{server.url}/hook", "secret": "s"}).send(message(), client=client)

    assert (result.ok, result.status_code, result.retryable) == (ok, status, retryable)


def test_webhook_retry_after_server_error_succeeds(server: RecordingServer, client: httpx.Client) -> None:
    server.respond_sequence([(503, {"error": "maintenance"}), (200, {"received": True})])
    notifier = notifier_for("webhook", {"url": f"{server.url}/hook", "secret": "s"})

    first, second = (notifier.send(message(), client=client) for _ in range(2))

    assert (first.ok, first.retryable, second.ok) == (False, True, True)
    assert server.wait_for(2, timeout=0.1)


def test_webhook_payload_json_cannot_carry_fails_without_retry(server: RecordingServer, client: httpx.Client) -> None:
    bad = Message(title=TITLE, markdown=MARKDOWN, text=TEXT, payload={"at": object()})
    result = notifier_for("webhook", {"url": f"{server.url}/hook", "secret": "s"}).send(bad, client=client)

    assert (result.ok, result.retryable) == (False, False)
    assert server.requests == []


# --- e-mail ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str | None
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RecordingHandler:
    """aiosmtpd handler: keeps every accepted message; `data_reply` and `refuse` script failures."""

    received: list[ReceivedMail] = field(default_factory=list)
    data_reply: str = "250 Message accepted for delivery"
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> RCPT reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            self.received.append(
                ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or b"")
            )
        return self.data_reply


@pytest.fixture
def smtp_server() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="smtp.test")
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def email_config(port: int, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "sender": "StorePulse <storepulse@example.com>",
        "recipients": ["ops-hq@example.com", "区域经理 <zj-manager@example.com>"],
        "timeout_s": 5,
    }
    return config | overrides


def test_email_delivers_chinese_subject_and_body(smtp_server: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_server
    with httpx.Client() as unused:
        result = notifier_for("email", email_config(port)).send(message(), client=unused)

    assert (result.ok, result.status_code) == (True, 250)
    (mail,) = handler.received
    assert mail.mail_from == "storepulse@example.com"
    assert mail.rcpt_tos == ["ops-hq@example.com", "zj-manager@example.com"]
    assert mail.data.isascii()  # survives relays that are not 8-bit clean
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == TITLE
    assert parsed["To"].addresses[1].display_name == "区域经理"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_content().replace("\r\n", "\n").rstrip("\n") == TEXT


def test_email_unreachable_server_is_retryable() -> None:
    with httpx.Client() as unused:
        result = notifier_for("email", email_config(closed_port())).send(message(), client=unused)

    assert (result.ok, result.status_code, result.retryable) == (False, None, True)


@pytest.mark.parametrize(
    ("reply", "code", "retryable"),
    [("451 4.3.0 Try again later", 451, True), ("554 5.7.1 Message rejected as spam", 554, False)],
)
def test_email_data_replies_decide_retry(
    smtp_server: tuple[RecordingHandler, int], reply: str, code: int, retryable: bool
) -> None:
    handler, port = smtp_server
    handler.data_reply = reply
    with httpx.Client() as unused:
        result = notifier_for("email", email_config(port)).send(message(), client=unused)

    assert (result.ok, result.status_code, result.retryable) == (False, code, retryable)
    assert reply[4:] in result.detail


def test_email_refused_recipient_fails_without_resending_to_the_others(
    smtp_server: tuple[RecordingHandler, int],
) -> None:
    handler, port = smtp_server
    handler.refuse = {"zj-manager@example.com": "550 5.1.1 No such user"}
    with httpx.Client() as unused:
        result = notifier_for("email", email_config(port)).send(message(), client=unused)

    assert (result.ok, result.status_code, result.retryable) == (False, 550, False)
    assert "zj-manager@example.com" in result.detail
    assert [mail.rcpt_tos for mail in handler.received] == [["ops-hq@example.com"]]


def test_email_all_recipients_temporarily_refused_is_retryable(smtp_server: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_server
    handler.refuse = {"ops-hq@example.com": "450 4.2.1 Mailbox busy", "zj-manager@example.com": "451 4.3.0 Later"}
    with httpx.Client() as unused:
        result = notifier_for("email", email_config(port)).send(message(), client=unused)

    assert (result.ok, result.retryable) == (False, True)
    assert handler.received == []


def test_email_login_against_a_server_without_auth_is_not_retried(smtp_server: tuple[RecordingHandler, int]) -> None:
    _, port = smtp_server  # aiosmtpd offers AUTH only over TLS, so plain SMTP here has none
    config = email_config(port, username="storepulse", password="pw")
    with httpx.Client() as unused:
        result = notifier_for("email", config).send(message(), client=unused)

    assert (result.ok, result.retryable) == (False, False)


# --- registry and configuration ---------------------------------------------------------------


def test_registry_builds_each_adapter_by_name() -> None:
    assert set(NOTIFIERS) == {"wecom", "dingtalk", "webhook", "email"}
    notifier = notifier_for("wecom", {"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"})
    assert isinstance(notifier, WeComNotifier)
    assert notifier.name == "wecom"


def test_unknown_adapter_lists_the_known_ones() -> None:
    with pytest.raises(NotifierConfigError) as caught:
        notifier_for("sms", {})
    assert str(caught.value) == "adapter: unknown notifier 'sms' (known: dingtalk, email, webhook, wecom)"


@pytest.mark.parametrize(
    ("adapter", "config", "message_start"),
    [
        ("wecom", {}, "url: required"),
        ("wecom", {"url": "ftp://qyapi.weixin.qq.com/send?key=k"}, "url: must be an http(s) URL"),
        ("wecom", {"url": "qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"}, "url: must be an http(s) URL"),
        ("wecom", {"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"}, "url: must carry the key="),
        ("wecom", {"url": "https://q/s?key=k", "mentioned_mobile_list": ["zhang"]}, "mentioned_mobile_list:"),
        ("wecom", {"url": "https://q/s?key=k", "mention": ["138"]}, "mention: unknown field"),
        ("dingtalk", {"url": "https://oapi.dingtalk.com/robot/send?access_token=t"}, "secret: required"),
        ("dingtalk", {"url": "https://oapi.dingtalk.com/robot/send?access_token=t", "secret": ""}, "secret:"),
        (
            "dingtalk",
            {"url": "https://oapi.dingtalk.com/robot/send", "secret": "s"},
            "url: must carry the access_token=",
        ),
        ("webhook", {"url": "https://example.com/hook"}, "secret: required"),
        ("webhook", {"url": "https://e/h", "secret": "s", "headers": {"x-storepulse-signature": "x"}}, "headers:"),
        ("email", {"host": "smtp.example.com", "sender": "a@example.com"}, "recipients: required"),
        ("email", {"host": "smtp.example.com", "sender": "a@example.com", "recipients": []}, "recipients:"),
        ("email", {"host": "h", "sender": "a@example.com", "recipients": ["ops"]}, "recipients: entry 0"),
        ("email", {"host": "h", "sender": "nobody", "recipients": ["a@example.com"]}, "sender:"),
        ("email", {"host": "h", "sender": "a@e.com", "recipients": ["b@e.com"], "username": "u"}, "password:"),
        ("email", {"host": "h", "sender": "a@e.com", "recipients": ["b@e.com"], "port": 0}, "port:"),
    ],
)
def test_bad_config_names_the_field(adapter: str, config: dict[str, Any], message_start: str) -> None:
    with pytest.raises(NotifierConfigError) as caught:
        notifier_for(adapter, config)
    assert str(caught.value).startswith(message_start)


def test_config_errors_never_echo_secret_values() -> None:
    with pytest.raises(NotifierConfigError) as caught:
        notifier_for("webhook", {"url": "ftp://example.com/hook?token=TOPSECRET", "secret": 12345})
    assert "url:" in str(caught.value) and "secret:" in str(caught.value)
    assert "TOPSECRET" not in str(caught.value) and "12345" not in str(caught.value)
