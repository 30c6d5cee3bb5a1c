"""Output ``type: forward``: each message to partner addresses, by SMTP.

Three formats (docs/outputs.md):

- ``attach``: a new mail from us (``sender``) to the partners, a short
  note and the message as a ``message/rfc822`` attachment;
- ``resend``: the message itself with a ``Resent-*`` block on top
  (RFC 5322 3.6.6), the partners as envelope recipients;
- ``arf``: an RFC 5965 abuse report (spamtrap.outputs.arf).

Every format carries the message as stored: our metadata block (with
``X-Spamtrap-Id``), the trap-hop ``Received:`` line and the message as
received, which for a set that redacts is the redacted copy. A retry sends
the same ``X-Spamtrap-Id`` and the same Message-ID (or Resent-Message-ID),
so a partner can drop the copy a retry after a crash may send.

The mail is made in a thread of the output's own, then goes through the
output's own ``relay`` or, without one, the top-level ``relay``: one
attempt per ``send`` (the runner retries), within ``timeout`` seconds
through spamtrap.smtp_client; a 5xx to the message is a permanent
failure, anything else is retried (:func:`classify`).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import spamtrap
from spamtrap.config.rules import (
    MIB,
    _address,
    _choice,
    _duration,
    _hostname,
    _nonempty,
    _port,
    _size,
    _string,
    rule,
)
from spamtrap.config.schema import OutputConfig, RelayConfig
from spamtrap.message import rfc2822_date
from spamtrap.outputs import arf
from spamtrap.outputs.base import (
    OutputContext,
    OutputFailure,
    OutputItem,
    PermanentFailure,
    TemporaryFailure,
)
from spamtrap.smtp_client import (
    RelayConfigError,
    check_relay,
    describe,
    dot_stuffed,
    reason,
    send_mail,
)

log = Logger()

FORMATS = ("attach", "resend", "arf")
RENDER_THREADS = 1  # per output: sends are few and rate-limited
USER_AGENT = f"spamtrap/{spamtrap.__version__}"


def _ascii_address(value: object) -> str:
    address = _address(value)
    if not address.isascii():
        raise ValueError(f"not an ASCII address: {value!r} (SMTPUTF8 is not spoken)")
    return address


def _subject_prefix(value: object) -> str:
    text = _string(value)
    if arf.clean_text(text, limit=100) != text:
        raise ValueError(f"must be one line of at most 100 characters: {text!r}")
    return text


@dataclass(frozen=True, kw_only=True)
class ForwardRelay:
    """An output's own relay: a whole one (nothing is taken from the
    top-level relay, credentials least of all)."""

    host: str = field(metadata=rule(_hostname))
    port: int = field(default=25, metadata=rule(_port))
    # Require STARTTLS (the relay's certificate is verified).
    starttls: bool = False
    # AUTH; a relay with credentials must use STARTTLS unless on loopback.
    username: str | None = field(default=None, metadata=rule(_nonempty))
    password: str | None = field(default=None, metadata=rule(_nonempty))


@dataclass(frozen=True, kw_only=True)
class Settings(OutputConfig):
    # The partners' addresses; each forward goes to all of them at once.
    to: list[str] = field(metadata=rule(_ascii_address, one_or_many=True, nonempty=True))
    # "attach" (the message as a message/rfc822 attachment), "resend" (the
    # message itself with Resent-* fields) or "arf" (an RFC 5965 report).
    format: str = field(default="attach", metadata=rule(_choice(*FORMATS)))
    # {host, port, starttls, username, password}; none: the top-level relay.
    relay: ForwardRelay | None = None
    # From: / Resent-From: and the envelope sender. None: relay.sender.
    sender: str | None = field(default=None, metadata=rule(_ascii_address))
    # Our Subject (attach, arf): "<subject_prefix> <set>: <its Subject>".
    subject_prefix: str = field(default="spamtrap", metadata=rule(_subject_prefix))
    # Seconds one attempt may take, connecting to the end of DATA.
    timeout: float = field(default=120.0, metadata=rule(_duration(positive=True)))
    # arf: a message larger than this is reported by its header alone
    # (text/rfc822-headers), as is one with NULs or lines over 998 bytes.
    max_original: int = field(default=1 * MIB, metadata=rule(_size()))

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.relay is not None:
            try:
                check_relay(relay_config(self.relay, "spamtrap@localhost"))
            except RelayConfigError as e:
                found.append(("relay", str(e).removeprefix("relay: ")))
        if len(set(self.to)) != len(self.to):
            found.append(("to", "an address is listed twice"))
        return found


def relay_config(relay: ForwardRelay, sender: str) -> RelayConfig:
    return RelayConfig(
        host=relay.host,
        port=relay.port,
        starttls=relay.starttls,
        username=relay.username,
        password=relay.password,
        sender=sender,
    )


# -- the mails -----------------------------------------------------------------------


def attach_mail(item: OutputItem, report: arf.Report, now: float, eight_bit: bool) -> bytes:
    """A mail to the partners with the message attached as ``message/rfc822``.

    A message that cannot travel so (NULs, lines over 998 bytes, or 8-bit
    bytes when the relay does not take them) is attached as
    ``application/octet-stream`` in base64 instead, its bytes intact.
    """
    env = item.envelope
    wire = arf.wire_form(item.message())
    encoding = arf.fits(wire, eight_bit)
    if encoding is not None:
        fields = [
            ("Content-Type", "message/rfc822"),
            ("Content-Disposition", f'inline; filename="{item.id}.eml"'),
            ("Content-Transfer-Encoding", encoding),
        ]
        attachment = arf.part(fields, wire)
        how = "attached as message/rfc822"
    else:
        fields = [
            ("Content-Type", f'application/octet-stream; name="{item.id}.eml"'),
            ("Content-Disposition", f'attachment; filename="{item.id}.eml"'),
            ("Content-Transfer-Encoding", "base64"),
        ]
        attachment = arf.part(fields, _base64(item.message()))
        how = "attached in base64 (it cannot travel as message/rfc822)"
    lines = [
        "A spam trap received the attached message; nobody asked for it.",
        f"It was received on {rfc2822_date(env.received_at)} and kept in set {item.set_name}.",
        f"The message is {how}, with our metadata on top.",
        "",
        f"spamtrap message id: {item.id}",
    ]
    note = "".join(line + "\r\n" for line in lines).encode("ascii", "replace")
    text_fields = [
        ("Content-Type", 'text/plain; charset="us-ascii"'),
        ("Content-Transfer-Encoding", "7bit"),
    ]
    parts = [arf.part(text_fields, note), attachment]
    boundary = arf.boundary_for(*parts)
    subject = arf.original_subject(item.message())
    headers = [
        ("From", report.sender),
        ("To", arf.address_list(report.to)),
        ("Subject", arf.subject_line(report.subject_prefix, item.set_name, subject)),
        ("Date", rfc2822_date(now)),
        ("Message-ID", arf.message_id(item.id, "attach", report.output, report.reporting_mta)),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/mixed;\r\n boundary="{boundary}"'),
        ("X-Spamtrap-Id", item.id),
        ("Auto-Submitted", "auto-generated"),
    ]
    return arf.multipart(headers, parts, boundary)


def _base64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")  # lines of 76 characters


def resend_mail(item: OutputItem, report: arf.Report, now: float) -> bytes:
    """The message as stored, with a Resent-* block on top (RFC 5322
    3.6.6): the relay's Received line then forms the block's trace. The
    bytes go as they are (CRLF line ends), 8-bit or not."""
    resent = [
        ("Resent-From", report.sender),
        ("Resent-To", arf.address_list(report.to)),
        ("Resent-Date", rfc2822_date(now)),
        (
            "Resent-Message-ID",
            arf.message_id(item.id, "resend", report.output, report.reporting_mta),
        ),
    ]
    head = b"".join(arf.field_line(n, v) for n, v in resent)
    return head + arf.wire_form(item.message())


class ForwardOutput:
    """One ``type: forward`` output: the mails of its format, through its relay."""

    def __init__(self, name: str, settings: Settings, context: OutputContext) -> None:
        self.name = name
        self.settings = settings
        self.reactor = context.reactor
        sender = settings.sender or context.relay.sender
        if not sender.isascii():
            raise ValueError(f"output {name}: sender {sender!r} is not ASCII; set its sender")
        if settings.relay is None:
            self.relay = context.relay
        else:
            self.relay = relay_config(settings.relay, sender)
        check_relay(self.relay)  # the top-level relay's rules are checked here
        self.helo = _helo_name(context.hostname)
        self.sets = context.sets
        self.report = arf.Report(
            sender=sender,
            to=tuple(settings.to),
            subject_prefix=settings.subject_prefix,
            user_agent=USER_AGENT,
            reporting_mta=context.hostname,
            output=name,
            include_rcpts=False,
            max_original=settings.max_original,
        )
        self.report_with_rcpts = dataclasses.replace(self.report, include_rcpts=True)
        self._sends: set[defer.Deferred[Any]] = set()
        self._closed = False
        # Mails are made in a thread of the output's own: a 10 MB message
        # takes a good part of a second, which SMTP intake must not wait for.
        self._pool: ThreadPool | None = None
        self.render: Callable[..., defer.Deferred[Any]] = self._in_thread
        # The relay's certificate is verified against the system's roots.
        self.client_tls: Callable[[str], Any] = ssl.optionsForClientTLS

    def describe(self) -> str:
        to = ", ".join(self.settings.to)
        return f"forward ({self.settings.format}) to {to} via {self.relay.host}:{self.relay.port}"

    def redacts(self, set_name: str) -> bool:
        found = self.sets.get(set_name)
        return found is None or found.redact_trap_addresses

    def mail(self, item: OutputItem, now: float, eight_bit: bool) -> bytes:
        """The mail for ``item`` in this output's format, CRLF line ends."""
        fmt = self.settings.format
        if fmt == "resend":
            return resend_mail(item, self.report, now)
        if fmt == "attach":
            return attach_mail(item, self.report, now, eight_bit)
        # Original-Rcpt-To names the trap: only where the set does not redact.
        report = self.report if self.redacts(item.set_name) else self.report_with_rcpts
        return arf.build_report(
            item.envelope, item.set_name, item.message(), report, now, eight_bit
        )

    def variants(self, item: OutputItem, now: float) -> tuple[bytes, bytes]:
        """The mail, dot-stuffed, for a relay that takes 8-bit and for one
        that does not (the same object when the mail is 7-bit): both made
        before connecting, the client picks one after EHLO."""
        eight = dot_stuffed(self.mail(item, now, eight_bit=True))
        seven = eight if eight.isascii() else dot_stuffed(self.mail(item, now, eight_bit=False))
        return eight, seven

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._pool is None:
            self._pool = ThreadPool(0, RENDER_THREADS, name=f"spamtrap-forward-{self.name}")
            self._pool.start()
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def send(self, item: OutputItem) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(TemporaryFailure("stopped", "the output is closed"))
        made = self.render(self.variants, item, self.reactor.seconds())
        return made.addCallback(self._transfer, item)

    def _transfer(self, variants: tuple[bytes, bytes], item: OutputItem) -> defer.Deferred[Any]:
        if self._closed:
            raise TemporaryFailure("stopped", "the output is closed")
        s = self.settings
        sent = send_mail(
            self.reactor,
            self.relay,
            self.helo,
            self.report.sender,
            s.to,
            variants,
            s.timeout,
            self.client_tls,
        )
        self._sends.add(sent)
        return sent.addBoth(self._finished, sent, item)

    def _finished(self, outcome: Any, sent: defer.Deferred[Any], item: OutputItem) -> Any:
        self._sends.discard(sent)
        if isinstance(outcome, Failure):
            raise classify(outcome)
        if outcome:
            # The rest took it: a retry would send them a second copy.
            shown = "; ".join(
                f"{a.decode()}: {code} {reply.decode('utf-8', 'replace')}"
                for a, code, reply in outcome
            )
            log.warn(
                "output {name}: {id} was refused for some partners: {refused}",
                name=self.name,
                id=item.id,
                refused=shown,
            )
        return None

    def close(self) -> None:
        """Sends in flight are dropped (their entries stay queued); the
        thread that makes the mails stops."""
        self._closed = True
        for send in list(self._sends):
            send.cancel()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None


def classify(failure: Failure) -> OutputFailure:
    """What a failed attempt means for the entry: a 5xx to the message is
    permanent, anything else (spamtrap.smtp_client.reason) temporary."""
    e = failure.value
    assert e is not None
    if isinstance(e, OutputFailure):
        return e
    why = reason(e)
    kind = PermanentFailure if why == "5xx" else TemporaryFailure
    return kind(why, describe(e))


def _helo_name(hostname: str) -> bytes:
    try:
        return hostname.encode("idna") or b"localhost"
    except UnicodeError:
        return b"localhost"


def build(name: str, settings: Settings, context: OutputContext) -> ForwardOutput:
    return ForwardOutput(name, settings, context)
