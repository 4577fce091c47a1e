"""E-mail over SMTP (smtplib): the title as subject, the plain-text body, to a fixed recipient list.

Config: ``host``, ``port`` (25), ``sender``, ``recipients`` (at least one), optionally
``username`` and ``password`` (both or neither; AUTH after STARTTLS when that is on),
``starttls`` (false) and ``timeout_s`` (10). Subject and body are UTF-8: the subject as RFC 2047
encoded words, a non-ASCII body as base64, so 8-bit-unsafe relays pass Chinese text intact.

Replies map onto retries the way SMTP defines them: 4xx is transient (retry), 5xx is permanent.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid, parseaddr
from typing import ClassVar

import httpx
from pydantic import Field, field_validator, model_validator

from adapters.notify.base import DeliveryResult, Message, Notifier, NotifierSettings, one_line, register

# 7-bit transfer: the body goes as base64 or quoted-printable, never as raw 8-bit bytes.
MAIL_POLICY = SMTP_POLICY.clone(cte_type="7bit")


def _address(value: str) -> str:
    _, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not (local and at and domain):
        raise ValueError("must be an e-mail address")
    return value


class EmailSettings(NotifierSettings):
    host: str = Field(min_length=1)
    port: int = Field(default=25, ge=1, le=65535)
    sender: str
    recipients: list[str] = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return _address(value)

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        for index, recipient in enumerate(value):
            try:
                _address(recipient)
            except ValueError:
                raise ValueError(f"entry {index} must be an e-mail address") from None
        return value

    @model_validator(mode="after")
    def _credentials(self) -> EmailSettings:
        if self.username is not None and self.password is None:
            raise ValueError("password: required when username is set")
        if self.password is not None and self.username is None:
            raise ValueError("username: required when password is set")
        return self


def smtp_retryable(code: int) -> bool:
    """4xx replies are transient by definition; anything else a server answers is permanent."""
    return 400 <= code < 500


@register
class EmailNotifier(Notifier):
    name: ClassVar[str] = "email"
    settings_model: ClassVar[type[NotifierSettings]] = EmailSettings
    settings: EmailSettings

    def build(self, message: Message) -> EmailMessage:
        settings = self.settings
        mail = EmailMessage(policy=MAIL_POLICY)
        mail["Subject"] = one_line(message.title)
        mail["From"] = settings.sender
        mail["To"] = ", ".join(settings.recipients)
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = make_msgid(domain=parseaddr(settings.sender)[1].rpartition("@")[2])
        mail.set_content(message.text, charset="utf-8")
        return mail

    def send(self, message: Message, *, client: httpx.Client) -> DeliveryResult:
        del client  # SMTP, not HTTP: the argument is part of the common signature only
        settings = self.settings
        mail = self.build(message)
        smtp = smtplib.SMTP(timeout=settings.timeout_s)
        try:
            code, reply = smtp.connect(settings.host, settings.port)
            if code != 220:
                return _reply_result(code, reply, "greeting")
            if settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.username is not None and settings.password is not None:
                smtp.login(settings.username, settings.password)
            # Bare addresses for the envelope: a display name in Chinese there would make smtplib demand
            # SMTPUTF8, which many servers lack, although the headers carry it fine as encoded words.
            refused = smtp.send_message(
                mail, from_addr=parseaddr(settings.sender)[1], to_addrs=[parseaddr(r)[1] for r in settings.recipients]
            )
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "all recipients refused: " + _refusals(exc.recipients)
            return DeliveryResult(
                ok=False, status_code=codes[0], detail=detail, retryable=all(map(smtp_retryable, codes))
            )
        except smtplib.SMTPResponseException as exc:
            return _reply_result(exc.smtp_code, exc.smtp_error, "reply")
        except smtplib.SMTPNotSupportedError as exc:
            # STARTTLS or AUTH configured for a server that does not offer it.
            return DeliveryResult(ok=False, status_code=None, detail=f"not supported: {exc}", retryable=False)
        except ssl.SSLCertVerificationError as exc:
            return DeliveryResult(ok=False, status_code=None, detail=f"TLS certificate: {exc}", retryable=False)
        except (smtplib.SMTPException, OSError) as exc:
            # Refused or dropped connections, timeouts, DNS failures: the server may be back later.
            return DeliveryResult(ok=False, status_code=None, detail=f"{type(exc).__name__}: {exc}", retryable=True)
        finally:
            _close(smtp)
        if refused:
            # The others already have it: a retry would send them a duplicate, so report and stop.
            detail = f"delivered to {len(settings.recipients) - len(refused)}, refused: {_refusals(refused)}"
            return DeliveryResult(ok=False, status_code=next(iter(refused.values()))[0], detail=detail, retryable=False)
        return DeliveryResult(
            ok=True, status_code=250, detail=f"accepted for {len(settings.recipients)} recipient(s)", retryable=False
        )


def _reply_result(code: int, reply: bytes | str, stage: str) -> DeliveryResult:
    text = reply.decode("utf-8", errors="replace") if isinstance(reply, bytes) else reply
    return DeliveryResult(
        ok=False, status_code=code, detail=f"SMTP {stage} {code}: {text}", retryable=smtp_retryable(code)
    )


def _refusals(refused: dict[str, tuple[int, bytes]]) -> str:
    return ", ".join(
        f"{address} ({code} {reply.decode('utf-8', errors='replace')})" for address, (code, reply) in refused.items()
    )


def _close(smtp: smtplib.SMTP) -> None:
    # A failing QUIT after the message was accepted must not turn a delivery into a failure.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
