"""Email over SMTP (Mailpit locally). smtplib blocks, so each attempt runs in a worker thread
with socket timeouts and an overall deadline; the caller decides about retries.

Errors are sorted for the caller: TransientMailError (connection trouble, 4xx replies: try
again) and PermanentMailError (5xx replies, an address that cannot be put in a header: trying
again cannot help)."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from common.config import Settings

SENDER = "Simple Bank <no-reply@simplebank.local>"
MESSAGE_ID_DOMAIN = "simplebank.local"
SOCKET_TIMEOUT_S = 5.0  # each SMTP command
ATTEMPT_TIMEOUT_S = 20.0  # one whole attempt: connect, EHLO, (TLS, login,) MAIL, RCPT, DATA, QUIT


class TransientMailError(Exception):
    pass


class PermanentMailError(Exception):
    pass


@dataclass(frozen=True)
class Email:
    recipient: str
    subject: str
    text: str
    message_id: str  # without angle brackets; the same for every attempt, so receivers can drop copies


def _message(email: Email) -> EmailMessage:
    message = EmailMessage()
    try:
        message["From"] = SENDER
        message["To"] = email.recipient
        message["Subject"] = email.subject
        message["Message-ID"] = f"<{email.message_id}>"
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message.set_content(email.text)
    except ValueError as exc:  # e.g. a line break in the address: header injection refused
        raise PermanentMailError(f"cannot build the message: {exc}") from exc
    return message


def _is_transient_reply(code: int) -> bool:
    return not 500 <= code < 600  # 4xx, and odd codes like -1 for a garbled reply


def _send_blocking(settings: Settings, message: EmailMessage) -> None:
    try:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=SOCKET_TIMEOUT_S)
        try:
            if settings.smtp_user:
                # Never send a password in clear: a server that cannot STARTTLS is refused.
                smtp.starttls(context=ssl.create_default_context())
                smtp.login(settings.smtp_user, settings.smtp_password)
            smtp.send_message(message)
        except BaseException:
            smtp.close()
            raise
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        if all(_is_transient_reply(code) for code in codes):
            raise TransientMailError(f"recipient refused for now: {codes}") from exc
        raise PermanentMailError(f"recipient refused: {codes}") from exc
    except smtplib.SMTPResponseException as exc:  # sender refused, data refused, auth failed, ...
        if _is_transient_reply(exc.smtp_code):
            raise TransientMailError(f"server replied {exc.smtp_code}") from exc
        raise PermanentMailError(f"server replied {exc.smtp_code}") from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise TransientMailError(f"server disconnected: {exc}") from exc
    except smtplib.SMTPNotSupportedError as exc:  # e.g. no STARTTLS while credentials are set
        raise PermanentMailError(f"server does not support a needed extension: {exc}") from exc
    except OSError as exc:  # refused, reset, timed out (smtplib's own errors are OSErrors too: caught above)
        raise TransientMailError(f"{type(exc).__name__}: {exc}") from exc
    # Accepted: the message is the server's now. A goodbye that fails (a reply other than 221, a
    # reset) must not make it a transient failure, whose retry would send a second copy.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def send(self, email: Email) -> None:
        """One attempt. Raises TransientMailError or PermanentMailError."""
        message = _message(email)
        try:
            # The thread cannot be cancelled; its socket timeouts end it soon after the deadline.
            await asyncio.wait_for(asyncio.to_thread(_send_blocking, self._settings, message), ATTEMPT_TIMEOUT_S)
        except TimeoutError as exc:
            raise TransientMailError(f"no answer within {ATTEMPT_TIMEOUT_S}s") from exc
