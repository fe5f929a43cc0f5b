"""Email over SMTP (Mailpit locally), asynchronously (aiosmtplib): no thread per attempt.

Connections are kept and reused (persistent SMTP: one connect, EHLO and, with credentials,
STARTTLS and AUTH for many messages), at most BANK_SMTP_CONNECTIONS at once, one message at a
time each. A new connection per message, made by smtplib in a worker thread, cost a handshake
and three more round trips per email, and the threads queued for the interpreter lock behind
the event loop: that was most of svc_notify's time per email (measured: 98 emails/s). A
connection that failed in any way is closed, never reused; one idle longer than IDLE_MAX_S or
used for MESSAGES_PER_CONNECTION_MAX messages is closed with QUIT, so a server's idle timeout
or per-connection limit is never met half-way.

Messages whose headers and text are plain ASCII (nearly all: amounts, ids, English text) are
written out directly (7bit, lines of at most 998 bytes as RFC 5322 allows), which costs a
fraction of building an email.message.EmailMessage; anything else (a name or description
with other characters) still goes through EmailMessage, which encodes it properly.

Errors are sorted for the caller: TransientMailError (connection trouble, 4xx replies: try
again) and PermanentMailError (5xx replies, an address that cannot be put in a header: trying
again cannot help)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from common.config import Settings

SENDER = "Simple Bank <no-reply@simplebank.local>"
SENDER_ADDRESS = "no-reply@simplebank.local"
MESSAGE_ID_DOMAIN = "simplebank.local"
CONNECT_TIMEOUT_S = 5.0  # connect, EHLO, (STARTTLS, AUTH)
SOCKET_TIMEOUT_S = 5.0  # each SMTP command
ATTEMPT_TIMEOUT_S = 20.0  # one whole attempt: (connect, EHLO, TLS, login,) MAIL, RCPT, DATA
IDLE_MAX_S = 10.0  # a kept connection unused this long is closed rather than reused
MESSAGES_PER_CONNECTION_MAX = 500  # then the connection is closed and a new one opened
LINE_MAX_BYTES = 998  # RFC 5322: a line of a message, without its CRLF


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


def _plain_header(value: str) -> bool:
    # isprintable() is False for CR, LF and every other control character: no header injection.
    return value.isascii() and value.isprintable() and len(value) <= 900


def _plain(email: Email) -> bytes | None:
    """The message as bytes when everything in it is plain ASCII, else None."""
    if not (_plain_header(email.recipient) and _plain_header(email.subject) and _plain_header(email.message_id)
            and "@" in email.recipient and email.text.isascii()):
        return None
    lines = email.text.split("\n")
    if any(len(line) > LINE_MAX_BYTES or "\r" in line or not (line.isprintable() or not line) for line in lines):
        return None
    return (f"From: {SENDER}\r\nTo: {email.recipient}\r\nSubject: {email.subject}\r\n"
            f"Message-ID: <{email.message_id}>\r\nDate: {formatdate(localtime=False, usegmt=True)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n" + "\r\n".join(lines)).encode("ascii")


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


class _Connection:
    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.sent = 0
        self.last_used = time.monotonic()

    @classmethod
    async def open(cls, settings: Settings) -> _Connection:
        credentials = bool(settings.smtp_user)
        smtp = aiosmtplib.SMTP(
            hostname=settings.smtp_host, port=settings.smtp_port, timeout=SOCKET_TIMEOUT_S,
            local_hostname=_local_hostname(),
            # Never send a password in clear: with credentials, a server that cannot STARTTLS is
            # refused; without, no TLS is attempted (the local sink).
            start_tls=credentials, tls_context=ssl.create_default_context() if credentials else None,
            username=settings.smtp_user or None, password=settings.smtp_password or None)
        await smtp.connect(timeout=CONNECT_TIMEOUT_S)
        return cls(smtp)

    def worn(self) -> bool:
        return (self.sent >= MESSAGES_PER_CONNECTION_MAX or time.monotonic() - self.last_used > IDLE_MAX_S
                or not self.smtp.is_connected)

    async def quit(self) -> None:
        # The messages sent on it are the server's already: a goodbye that fails (a reply other
        # than 221, a reset, no answer) changes nothing about them.
        try:
            await asyncio.wait_for(self.smtp.quit(), SOCKET_TIMEOUT_S)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.smtp.close()


_hostname: str | None = None


def _local_hostname() -> str:
    """The name given in EHLO, looked up once (aiosmtplib would look it up per connection)."""
    global _hostname
    if _hostname is None:
        _hostname = socket.getfqdn()
    return _hostname


def _classified(exc: BaseException) -> Exception:
    """The TransientMailError or PermanentMailError an SMTP or socket error stands for."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        if all(_is_transient_reply(code) for code in codes):
            return TransientMailError(f"recipient refused for now: {codes}")
        return PermanentMailError(f"recipient refused: {codes}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # sender refused, data refused, auth failed, ...
        if _is_transient_reply(exc.code):
            return TransientMailError(f"server replied {exc.code}")
        return PermanentMailError(f"server replied {exc.code}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):  # e.g. no STARTTLS while credentials are set
        return PermanentMailError(f"server does not support a needed extension: {exc}")
    # refused, reset, disconnected, timed out
    return TransientMailError(f"{type(exc).__name__}: {exc}")


class Mailer:
    """Started and stopped as a worker of the service (stop closes the kept connections); used
    before start, it works the same."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._idle: list[_Connection] = []  # kept connections, most recently used last
        self._slots = asyncio.Semaphore(max(1, settings.smtp_connections))  # messages in flight

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(connection.quit() for connection in idle))

    async def _take(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.worn():
                return connection
            await connection.quit()
        return await _Connection.open(self._settings)

    async def _send(self, message: bytes | EmailMessage, recipient: str) -> None:
        try:
            connection = await self._take()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _classified(exc) from exc
        try:
            if isinstance(message, bytes):
                await connection.smtp.sendmail(SENDER_ADDRESS, [recipient], message)
            else:
                await connection.smtp.send_message(message)
        except BaseException as exc:
            connection.smtp.close()  # in an unknown state (or cancelled half-way): never reused
            if isinstance(exc, (aiosmtplib.SMTPException, OSError)):
                raise _classified(exc) from exc
            raise
        # Accepted: the message is the server's now.
        connection.sent += 1
        connection.last_used = time.monotonic()
        self._idle.append(connection)

    async def send(self, email: Email) -> None:
        """One attempt. Raises TransientMailError or PermanentMailError."""
        plain = _plain(email)
        message: bytes | EmailMessage = plain if plain is not None else _message(email)
        async with self._slots:
            try:
                await asyncio.wait_for(self._send(message, email.recipient), ATTEMPT_TIMEOUT_S)
            except TimeoutError as exc:
                raise TransientMailError(f"no answer within {ATTEMPT_TIMEOUT_S}s") from exc
