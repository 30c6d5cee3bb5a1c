"""The SMTP commands the trap answers, and how a reply is written.

:class:`Commands` is a mixin of :class:`spamtrap.intake.smtp.TrapSMTP` with one
``do_*``/``ext_*`` method per verb (HELO, EHLO, MAIL, RCPT, DATA, RSET,
QUIT, STARTTLS ...), looked up by ``TrapSMTP.lookupMethod``; the relay
verbs are in :mod:`spamtrap.intake.relay_commands`. Each validates synchronously, so
pipelined commands are answered in order.
"""

from __future__ import annotations

from spamtrap.intake import relay
from spamtrap.intake.base import SessionBase
from spamtrap.intake.data import DATA_SENTINEL
from spamtrap.intake.envelope import Transaction
from spamtrap.intake.parse import param_value, parse_path
from spamtrap.intake.relay import as_text
from spamtrap.intake.replies import send_reply
from spamtrap.intake.state import SessionState

DATA = SessionState.DATA
CLOSED = SessionState.CLOSED


def format_reply(code: int, message: bytes) -> bytes:
    """One SMTP reply, multi-line when ``message`` has line ends."""
    if b"\n" not in message and b"\r" not in message:
        return b"%d %s\r\n" % (code, message)
    lines = message.splitlines() or [b""]
    last = lines.pop()
    return b"".join([b"%d-%s\r\n" % (code, line) for line in lines]) + b"%d %s\r\n" % (code, last)


class Commands(SessionBase):
    """The verbs of :class:`spamtrap.intake.smtp.TrapSMTP` (a mixin: it has no state of its own)."""

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        # The parent offers only AUTH and STARTTLS. A trap never offers AUTH.
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.factory.config.smtp.max_message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self._from_relay():
            # Only to trusted relays: from anyone else they would forge the client.
            ext[b"XFORWARD"] = [a.encode() for a in relay.XFORWARD_ATTRS]
            ext[b"XCLIENT"] = [a.encode() for a in relay.XCLIENT_ATTRS]
        return ext

    def _set_helo(self, verb: bytes, rest: bytes) -> None:
        self._helo_verb = verb.upper()
        self._helo_arg = rest.strip()
        self._end_transaction()

    def do_HELO(self, rest: bytes) -> None:
        self._set_helo(b"HELO", rest)
        self.sendCode(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        self._set_helo(b"EHLO", rest)
        # The reply depends only on the config, on whether STARTTLS is
        # offered and on whether the peer is a trusted relay: render it once
        # per factory.
        key = (bool(self.canStartTLS and not self.startedTLS), self._from_relay())
        replies = self.factory.ehlo_replies
        reply = replies.get(key)
        if reply is None:
            reply = replies[key] = format_reply(250, self.host + b"\n" + self.listExtensions())
        send_reply(self.transport, reply)

    def do_MAIL(self, rest: bytes) -> None:
        if self._txn is not None:
            self.sendCode(503, b"5.5.1 Error: nested MAIL command")
            return
        path = parse_path(b"MAIL", rest)
        if path is None:
            self.factory.metrics.smtp_errors.labels(kind="mail-syntax").inc()
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        if self._helo_arg is None:
            self.dialect.flags.add("no-helo")  # QUIRK: RFC 5321 4.1.4; recorded, not refused
        size = param_value(path.params, b"SIZE")
        limit = self.factory.config.smtp.max_message_size
        if size is not None and size.isdigit() and int(size) > limit:
            self.factory.metrics.messages_rejected.labels(reason="size").inc()
            self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
            return
        self._txn = Transaction(path.address, path.params)
        self._mailed = True  # idle_before_mail is over (_idle_deadline)
        self.sendCode(250, b"2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        txn = self._txn
        if txn is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        path = parse_path(b"RCPT", rest)
        if path is None or not path.address:
            self.factory.metrics.smtp_errors.labels(kind="rcpt-syntax").inc()
            self.sendCode(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(txn.rcpts) >= self.factory.config.smtp.max_recipients:
            self.sendCode(452, b"4.5.3 Error: too many recipients")
            return
        verdict = self.factory.traps.classify(as_text(path.address))
        if not verdict.accepted:
            self.factory.metrics.messages_rejected.labels(reason="rcpt").inc()
            self.sendCode(550, b"5.1.1 Recipient address rejected: relay access denied")
            return
        txn.rcpts.append((path.address, path.params))
        if verdict.feed and txn.feed is None:
            txn.feed = verdict.feed
        self.sendCode(250, b"2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        if self._txn is None or not self._txn.rcpts:
            self.sendCode(554, b"5.5.1 Error: no valid recipients")
            return
        self._move(DATA)
        self._data = bytearray(DATA_SENTINEL)
        self._data_overflow = False
        self.data_started_at = self.factory.clock.seconds()
        self._set_idle(self.factory.config.smtp.timeouts.data)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def do_BDAT(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.1 Error: CHUNKING not offered")

    def do_RSET(self, rest: bytes) -> None:
        self._end_transaction()
        self.sendCode(250, b"2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(252, b"2.0.0 Send some mail, I'll try my best")

    def do_HELP(self, rest: bytes) -> None:
        self.sendCode(214, b"2.0.0 See RFC 5321")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self._move(CLOSED)
        self.transport.loseConnection()

    def ext_AUTH(self, rest: bytes) -> None:
        # A trap offers no AUTH at all, and never over plaintext.
        self.sendCode(503, b"5.5.1 Error: authentication not enabled")

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            self.sendCode(503, b"5.5.1 Error: TLS already active")
            return
        if not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available")
            return
        if self._buf:
            # CVE-2011-0411: bytes pipelined after STARTTLS arrived in
            # plaintext and must not run inside the TLS session.
            self.dialect.flags.add("starttls-injection")
            self._buf.clear()
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        # RFC 3207 4.2: forget everything learnt before the handshake,
        # what a relay said of its client included.
        self._helo_arg = None
        self._helo_verb = b""
        self._end_transaction()
        self._xclient = None
        self._relay_helo = None
