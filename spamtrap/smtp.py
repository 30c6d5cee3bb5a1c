"""The trap's ESMTP server, built on twisted.mail.smtp.ESMTP.

Twisted's server is written for a friendly MTA, not for spammers. This
subclass keeps its reply formatting, TLS and timeout machinery, and takes
over the byte stream itself (``dataReceived``), because the line-based
parent has defects a trap cannot live with (each override says which):

- an over-long line in DATA flips the parent back to command mode and runs the
  rest of the body as SMTP commands; here DATA is scanned as raw bytes for
  CRLF.CRLF and has no line limit short of the message size. Only a client
  that never sent CRLF gets LF.LF as its end of data; any other lookalike is
  data and flags "smuggling" (see ``_data_chunk``);
- input without CRLF grows the parent's buffer without bound (copied
  quadratically); here one command line is capped at max_command_line (500,
  the rest of the line dropped, the session goes on), and input waiting
  behind a pending reply pauses the transport instead of growing;
- commands pipelined after STARTTLS were executed after the handshake
  (CVE-2011-0411 pattern); here they are discarded (RFC 3207 4.2);
- Deferred validation broke pipelining and MAIL parameters were dropped;
  here validation is synchronous and SIZE= is honoured;
- non-ASCII bytes in a verb raised out of dataReceived; here they get 500;
- one IMessage per recipient meant the body was written once per recipient;
  here each transaction is written once;
- SMTPFactory.timeout never reached the protocol; here timeouts come from
  the config, plus a cap on the whole session. One DelayedCall per session
  serves both (TimeoutMixin's is re-armed on every read and every mode
  change; ours only moves when a deadline comes earlier).

The 250 after DATA is sent only once ``submit`` (the durable spool) has the
message: see architecture "Durability at 250". Until then input is held
(``_waiting``) and the transport paused (``_paused``) until no whole
transaction is left in the held bytes, so every pipelined transaction is
answered in order and submitted once.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp

from spamtrap import proxy, relay
from spamtrap import spill as spill_mod
from spamtrap.config import Config
from spamtrap.errors import IntakeUnavailableError
from spamtrap.message import Envelope, iso_time, new_message_id, new_session_id, rfc2822_date
from spamtrap.metrics import Metrics
from spamtrap.smtp_parse import Dialect, bucket, param_value, parse_path
from spamtrap.spill import Spill, SpillDir
from spamtrap.traps import TrapMatcher

log = Logger()

COMMAND, DATA, PROXY, CLOSED = "COMMAND", "DATA", "PROXY", "CLOSED"
_SENTINEL = b"\r\n"  # DATA is scanned as if preceded by a line end


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _reply(code: int, message: bytes) -> bytes:
    if b"\n" not in message and b"\r" not in message:
        return b"%d %s\r\n" % (code, message)
    lines = message.splitlines() or [b""]
    last = lines.pop()
    return b"".join([b"%d-%s\r\n" % (code, line) for line in lines]) + b"%d %s\r\n" % (code, last)


def _path_field(address: str, params: tuple[bytes, ...]) -> str:
    """A MAIL FROM or RCPT TO as recorded: ``<address> PARAM=1 ...``."""
    if not params:
        return f"<{address}>"
    return " ".join([f"<{address}>", *map(_text, params)])


def _lf_end(data: bytearray, start: int) -> tuple[int, int]:
    """A bare-LF client's end of data from ``start``: (index of the LF before
    the dot, length of the terminator), or (-1, 0)."""
    lf = data.find(b"\n.\n", start)
    # A LF.CRLF before it ends the data first (the bound keeps the scan short).
    crlf = data.find(b"\n.\r\n", start, lf + 4 if lf >= 0 else len(data))
    if crlf >= 0:
        return crlf, 4
    return lf, (3 if lf >= 0 else 0)


_CR_AS_LF = bytes.maketrans(b"\r", b"\n")


def _crlf_end(data: bytearray, start: int) -> tuple[int, bool]:
    """A CRLF client's end of data from ``start``: (index of CRLF.CRLF or -1,
    whether an end-of-data lookalike came before it).

    With CR read as LF, "LF . LF" is found in the middle of CRLF.CRLF and in
    every lookalike (a dot between line-end bytes), and nowhere else: one
    translate and one find, about 1.6 times the plain search, find both.
    """
    t = (data if start == 0 else data[start:]).translate(_CR_AS_LF)
    p = t.find(b"\n.\n")
    if p >= 0:
        i = start + p
        if i > 0 and data[i - 1] == 13 and data[i] == 10 and data[i + 2] == 13:
            if i + 3 == len(data):
                return -1, False  # CRLF.CR so far: the next read tells
            if data[i + 3] == 10:
                return i - 1, False
        # A lookalike. The rest needs only the plain search: a message full
        # of them must not cost a Python loop per dot.
        return data.find(b"\r\n.\r\n", i), True
    return -1, False


# Seconds after the stop grace before connections still open are aborted.
HARD_CLOSE_DELAY = 2.0


def client_key(host: str) -> str:
    """What the per-IP limit counts: the address, an IPv4-mapped one as
    IPv4, and IPv6 by /64 (one host owns a whole /64, RFC 4291 2.5.1)."""
    if ":" not in host:
        # Twisted's IPv4 peer is already dotted-quad: skip the parse (it ran
        # for every connection and cost about 8 us).
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # a UNIX socket or the like: counted as one peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _host_port(address: Any) -> tuple[str, int]:
    return str(getattr(address, "host", address)), int(getattr(address, "port", 0) or 0)


class Transaction:
    """One MAIL ... DATA transaction."""

    def __init__(self, mail_from: bytes, params: tuple[bytes, ...]) -> None:
        self.mail_from = mail_from
        self.params = params
        self.rcpts: list[tuple[bytes, tuple[bytes, ...]]] = []
        self.feed: str | None = None


class TrapSMTP(smtp.ESMTP):
    transport: Any  # zope interfaces do not type-check as attributes without a plugin
    # Attribution behind a trusted relay (smtp.trusted_relays): the client
    # XCLIENT named for the session, the one XFORWARD named for the next
    # transaction, the relay's own HELO from before XCLIENT, and whether the
    # peer is a trusted relay at all (looked up once, after any PROXY header).
    _xclient: relay.Client | None = None
    _xforward: relay.Client | None = None
    _relay_helo: bytes | None = None
    _relay_trusted: bool | None = None

    def __init__(self, factory: TrapSMTPFactory) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=factory.tls_context)
        self.factory = factory
        self.clock = factory.clock
        self.host = factory.host
        self.timeout = factory.config.smtp.timeouts.command  # type: ignore[assignment]
        self._buf = bytearray()
        self._data = bytearray()
        self._data_overflow = False
        self._crlf_client = False  # a command line ended in CRLF: see _data_chunk
        self._discarding = False  # inside an over-long command line: drop to its LF
        self._state = COMMAND
        self._greeted = False
        self._waiting = False  # a reply is pending on the spool: hold input
        self._paused = False  # input arrived meanwhile: the transport is paused
        self._txn: Transaction | None = None
        self._helo_verb = b""
        self._helo_arg: bytes | None = None
        # The session's one timer, and the deadlines it serves.
        self._timer: Any = None
        self._greet_timer: Any = None
        self._session_deadline = math.inf
        self._stop_deadline = math.inf  # set by shutdown()
        # DATA over the memory budget goes to a spill file (spamtrap/spill.py):
        # then self._data holds only the last bytes, _data_base counts the
        # raw bytes before them.
        self._spill: Spill | None = None
        self._data_base = 0
        self._data_counted = 0  # this session's share of factory.data_in_memory
        self._spill_paused = False
        self._mailed = False  # a MAIL was accepted in this session
        self._counted_as: str | None = None  # the factory's per-IP key
        self._idle_period: float | None = None  # None: no idle timeout
        self._idle_since = 0.0
        self.dialect = Dialect()
        self.session_id = new_session_id()
        self.connected_at = factory.clock.seconds()
        self.first_command_at: float | None = None
        self.data_started_at = 0.0
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] | None = None  # looked up when first needed
        self.proxied_by: tuple[str, int] | None = None
        self.rdns: str | None = None

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        # Not the parent's: it greets at once and reads the peer as a string.
        f = self.factory
        self.peer = _host_port(self.transport.getPeer())
        self.canStartTLS = self.ctx is not None and ITLSTransport.providedBy(self.transport)
        refusal = f.admit(self)
        if refusal:
            self._refuse(refusal)
            return
        f.metrics.connections.inc()
        cap = f.config.smtp.timeouts.session
        if cap > 0:
            self._session_deadline = self.connected_at + cap
        self._set_idle(self.timeout)
        if f.trusts_proxy(self.peer[0]):
            self._state = PROXY
            return
        self._start()

    def _refuse(self, reason: str) -> None:
        self.factory.metrics.connections_refused.labels(reason=reason).inc()
        self.transport.write(b"421 4.7.0 %s Too many connections, try later\r\n" % self.host)
        self._state = CLOSED
        self.transport.loseConnection()

    def _start(self) -> None:
        f = self.factory
        # Here, not at connect: behind a trusted balancer self.peer is the
        # client the PROXY header named, which is what the limit is about.
        refusal = f.admit_peer(self)
        if refusal:
            self._refuse(refusal)
            return
        if f.resolve_ptr is not None and f.config.smtp.rdns:
            d = f.resolve_ptr(self.peer[0])
            d.addCallbacks(self._got_rdns, lambda _: None)
        delay = f.config.smtp.timeouts.greeting_delay
        if delay > 0:
            self._greet_timer = f.clock.callLater(delay, self._greet)
        else:
            self._greet()

    def _got_rdns(self, name: str) -> None:
        self.rdns = name

    def _greet(self) -> None:
        if self._state is CLOSED:
            return
        self._greeted = True
        self.sendCode(220, self.greeting())
        self._unhold()  # an early talker's input was held

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # One write per reply; the parent writes every line of it separately.
        self.transport.write(_reply(code, message))

    def greeting(self) -> bytes:
        return self.host + b" ESMTP spamtrap"

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._state = CLOSED
        for t in (self._timer, self._greet_timer):
            if t is not None and t.active():
                t.cancel()
        self._timer = None
        self._count_data(0)
        if self._spill is not None:
            self._spill.discard()
            self._spill = None
        self.factory.release(self)

    # -- timeouts -------------------------------------------------------------

    def _set_idle(self, period: float | None) -> None:
        """Restart the idle clock: close after ``period`` seconds of silence
        (None: never, e.g. while the spool has the message)."""
        now = self.clock.seconds()
        self._idle_since = now
        self._idle_period = period
        if period is not None:
            self._arm(now, self._idle_deadline())

    def _idle_deadline(self) -> float:
        """When silence closes the session. Until the first MAIL it is
        timeouts.idle_before_mail: an idle session only holds a slot.
        QUIRK: RFC 5321 4.5.3.2.7 suggests 5 minutes; senders that mean to
        send say MAIL within seconds, and the command timeout applies
        once they have."""
        period = self._idle_period
        if period is None:
            return math.inf
        if not self._mailed and self._state is not DATA:
            period = min(period, self.factory.config.smtp.timeouts.idle_before_mail)
        return self._idle_since + period

    def _arm(self, now: float, deadline: float) -> None:
        # Only an earlier deadline moves the timer; a later one is noticed
        # when the timer fires, which then re-arms for it.
        deadline = min(deadline, self._session_deadline, self._stop_deadline)
        t = self._timer
        if t is None:
            if deadline < math.inf:
                self._timer = self.clock.callLater(deadline - now, self._timer_fired)
        elif deadline < t.getTime():
            t.reset(deadline - now)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._state is CLOSED:
            return
        now = self.clock.seconds()
        if now >= self._stop_deadline:
            if not self._waiting:
                self._abort(421, b"4.3.2 Service shutting down")
                return
            # The spool has its message: the 250 (then 421) comes within a
            # commit, and the factory's hard close bounds a stuck disk.
            self._stop_deadline = math.inf
        if now >= self._session_deadline:
            self._abort(421, b"4.4.2 Session too long")
            return
        idle_deadline = self._idle_deadline()
        if now >= idle_deadline:
            self._abort(421, b"4.4.2 Timeout, closing connection")
            return
        self._arm(now, idle_deadline)

    def _abort(self, code: int, message: bytes) -> None:
        if self._state is CLOSED:
            return
        self.sendCode(code, message)
        self._state = CLOSED
        self.transport.loseConnection()

    def shutdown(self, grace: float) -> None:
        """The service is stopping: close idle sessions now, busy ones after
        their reply, and whatever is left after ``grace`` seconds (a client
        trickling its DATA must not hold the stop)."""
        if self._state is not DATA and not self._waiting:
            self._abort(421, b"4.3.2 Service shutting down")
            return
        now = self.clock.seconds()
        self._stop_deadline = now + grace
        self._arm(now, self._stop_deadline)

    # -- the byte stream ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state is CLOSED:
            return
        self._idle_since = self.clock.seconds()
        if not self._greeted and self._state is not PROXY:
            self.dialect.flags.add("early-talk")
        self._buf += data
        if self._waiting or (not self._greeted and self._state is not PROXY):
            # Hold further input until the reply (or the greeting) is sent,
            # and stop reading: held input is bounded by one read, not by
            # how much a pipelining peer pushes. Pausing only when input
            # actually comes (bots wait for the 250) saves two epoll calls
            # per message.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._pump()

    def _pump(self) -> None:
        # No cap on self._buf here: bytes waiting behind a pending reply are
        # whole pipelined transactions, bounded by the pause above. The
        # command-line cap is per line (_command_line), DATA is capped by
        # max_message_size (_data_chunk), PROXY by proxy.V2_MAX.
        while self._buf and not self._waiting and self._state is not CLOSED:
            if self._state is PROXY:
                if not self._proxy_header():
                    return
            elif not self._greeted:
                return
            elif self._state is DATA:
                if not self._data_chunk():
                    return
            elif not self._command_line():
                return

    def _unhold(self) -> None:
        """Run the held input; read from the peer again once nothing is pending."""
        self._pump()
        if self._paused and not self._waiting and self._state is not CLOSED:
            self._paused = False
            self.transport.resumeProducing()

    def _command_line(self) -> bool:
        buf = self._buf
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return False
            del buf[: nl + 1]
            self._discarding = False
            return True
        cap = self.factory.buffer_cap
        # A line may be cap bytes long, its line end included (RFC 5321
        # 4.5.3.1.4 counts the CRLF). Looking only at the first cap bytes
        # makes the verdict the same however TCP cut the stream.
        nl = buf.find(b"\n", 0, cap)
        if nl < 0:
            if len(buf) < cap:
                return False  # the rest of the line is still coming
            # Refuse the line, not the session: the bot may go on to send
            # its spam. The rest of the line, however long, is dropped.
            self.factory.metrics.smtp_errors.labels(kind="line-too-long").inc()
            self.dialect.flags.add("long-line")
            self.sendCode(500, b"5.5.2 Error: line too long")
            self._discarding = True
            return True
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
            self._crlf_client = True
        else:
            # QUIRK: RFC 5321 2.3.8 wants CRLF; bots send bare LF. Accept it.
            self.dialect.flags.add("bare-lf")
        if self._buf:
            self.dialect.flags.add("pipelining")
        if self.first_command_at is None:
            self.first_command_at = self.factory.clock.seconds()
        self.state_COMMAND(line)
        return True

    def state_COMMAND(self, line: bytes) -> None:
        parts = line.strip().split(None, 1)
        if not parts:
            self.sendCode(500, b"5.5.2 Error: bad syntax")
            return
        verb = parts[0]
        rest = parts[1] if len(parts) > 1 else b""
        self.dialect.command(verb, rest)
        if self.factory.stopping and verb.upper() not in (b"QUIT",):
            self._abort(421, b"4.3.2 Service shutting down")
            return
        method = self.lookupMethod(verb)
        if method is None:
            self.factory.metrics.smtp_errors.labels(kind="unknown-command").inc()
            self.sendCode(500, b"5.5.2 Error: command not recognized")
            return
        method(rest)

    def lookupMethod(self, command: bytes) -> Callable[[bytes], None] | None:
        # The parent decodes with nativeString and raises on non-ASCII bytes.
        if not command.isascii() or not command.isalpha():
            return None
        name = command.decode("ascii").upper()
        return getattr(self, "do_" + name, None) or getattr(self, "ext_" + name, None)

    # -- commands -------------------------------------------------------------

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
        self._txn = None
        self._xforward = None  # XFORWARD_README: attributes last one transaction

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
            reply = replies[key] = _reply(250, self.host + b"\n" + self.listExtensions())
        self.transport.write(reply)

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
        verdict = self.factory.traps.classify(_text(path.address))
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
        self._state = DATA
        self._data = bytearray(_SENTINEL)
        self._data_overflow = False
        self.data_started_at = self.factory.clock.seconds()
        self._set_idle(self.factory.config.smtp.timeouts.data)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def do_BDAT(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.1 Error: CHUNKING not offered")

    def do_RSET(self, rest: bytes) -> None:
        self._txn = None
        self._xforward = None  # XFORWARD_README: RSET ends the transaction
        self.sendCode(250, b"2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(252, b"2.0.0 Send some mail, I'll try my best")

    def do_HELP(self, rest: bytes) -> None:
        self.sendCode(214, b"2.0.0 See RFC 5321")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self._state = CLOSED
        self.transport.loseConnection()

    # -- trusted relays: XFORWARD and XCLIENT (Postfix) -------------------------

    def _from_relay(self) -> bool:
        trusted = self._relay_trusted
        if trusted is None:
            trusted = self._relay_trusted = self.factory.trusts_relay(self.peer[0])
        return trusted

    def _relay_attributes(
        self, verb: str, rest: bytes, allowed: tuple[str, ...], current: relay.Client | None
    ) -> relay.Client | None:
        """The client after this command, or None once refused (replied to)."""
        if not self._from_relay():
            # As Postfix; the attempt is in the dialect, nothing else changes.
            self.factory.metrics.smtp_errors.labels(kind="relay-unauthorized").inc()
            self.sendCode(550, b"5.7.0 Error: insufficient authorization")
            return None
        if self._txn is not None:
            self.sendCode(503, b"5.5.1 Error: MAIL transaction in progress")
            return None
        client = current.copy() if current is not None else relay.Client()
        try:
            relay.apply(client, relay.parse_attributes(verb, rest, allowed))
        except relay.RelayCommandError as e:
            self.factory.metrics.smtp_errors.labels(kind="relay-syntax").inc()
            self.sendCode(501, e.reply.encode("ascii", "replace"))
            return None
        return client

    def do_XFORWARD(self, rest: bytes) -> None:
        # Attributes add up over several commands until the transaction ends.
        client = self._relay_attributes("XFORWARD", rest, relay.XFORWARD_ATTRS, self._xforward)
        if client is not None:
            self._xforward = client
            self.sendCode(250, b"2.0.0 Ok")

    def do_XCLIENT(self, rest: bytes) -> None:
        client = self._relay_attributes("XCLIENT", rest, relay.XCLIENT_ATTRS, self._xclient)
        if client is None:
            return
        if self._xclient is None:
            self._relay_helo = self._helo_arg  # the relay's own, before it spoke for the client
        self._xclient = client
        # XCLIENT_README: the session starts over as for a new client, which
        # must say EHLO again; TLS stays.
        self._helo_arg = None
        self._helo_verb = b""
        self._xforward = None
        self.sendCode(220, self.greeting())

    def _attribution(self, content: bytes) -> tuple[relay.Client | None, str]:
        """(the original client or None, how it was learnt) for a relayed
        message; (None, "") for one straight from its sender."""
        if not self._from_relay():
            return None, ""
        if self._xforward is not None and self._xforward.addr:
            return self._xforward, "xforward"
        if self._xclient is not None and self._xclient.addr:
            client = self._xclient.copy()
            # XCLIENT HELO= wins: Postfix's smtpd_proxy sends its own
            # "EHLO $smtpd_proxy_ehlo" after XCLIENT. A later EHLO counts
            # only when XCLIENT gave no HELO.
            if client.helo is None and self._helo_arg is not None:
                client.helo = _text(self._helo_arg)
            return client, "xclient"
        # No XFORWARD: the relay's own Received lines say who its client was,
        # read down past the hops of trusted relays and loopback.
        derived = relay.derive_client(content, self.factory.trusts_hop)
        if derived is not None:
            return derived, "derived"
        return None, "unknown"

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
        self._txn = None
        self._xforward = None
        self._xclient = None
        self._relay_helo = None

    # -- DATA -----------------------------------------------------------------

    def _data_chunk(self) -> bool:
        """Move buffered bytes into the message; True once it has ended.

        Each read is searched from 4 bytes before its start, so a message
        costs one pass however TCP cut it. Which end of data counts depends
        on the client (see README "SMTP behaviour"):

        - a client that ended any command line so far (DATA included) with
          CRLF gets strict CRLF.CRLF. Every other end-of-data lookalike
          (LF.LF, CR.CR, LF.CRLF, CRLF.LF, CR.CRLF, CRLF.CR) stays data and
          flags the session "smuggling": a relay behind us that accepted it
          would see a second, forged message (SMTP smuggling, SEC Consult
          2023, CVE-2023-51764). A lone LF is data too, so ``LF..`` keeps
          both dots: a line starts after CRLF only.
        - a client whose command lines all ended in bare LF is a bare-LF
          bot. QUIRK: RFC 5321 2.3.8 forbids bare LF, but such bots end DATA
          with LF.LF and would time out unanswered. A line starts after any
          LF, so LF.LF and LF.CRLF end its data and LF-led dots are
          unstuffed (RFC 5321 4.5.2 applied to its lines).
        """
        data = self._data
        start = max(len(data) - 4, 0)
        data += self._buf
        self._buf.clear()
        if self._crlf_client:
            skip = 5
            if "smuggling" in self.dialect.flags:
                end = data.find(b"\r\n.\r\n", start)
            else:
                end, smuggled = _crlf_end(data, start)
                if smuggled:
                    self.dialect.flags.add("smuggling")
        else:
            end, skip = _lf_end(data, start)
        limit = self.factory.config.smtp.max_message_size
        if end < 0:
            if len(data) - len(_SENTINEL) > limit:
                # Past the limit: keep only what can still hold the terminator.
                self._data_overflow = True
                del data[:-4]
            self._hold_or_spill()
            return False
        self._buf += data[end + skip :]
        self._state = COMMAND
        self._set_idle(self.timeout)
        if self._data_ended(data, end):
            return True
        if self._data_overflow or end > limit + len(_SENTINEL):
            self._txn = None
            self._data = bytearray()
            self.factory.metrics.messages_rejected.labels(reason="size").inc()
            self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
            return True
        # RFC 5321 4.5.2: drop the first period of every line that has one.
        if self._crlf_client:
            content = bytes(data[: end + 2]).replace(b"\r\n.", b"\r\n")[len(_SENTINEL) :]
        else:
            content = bytes(data[: end + 1]).replace(b"\n.", b"\n")[len(_SENTINEL) :]
        self._data = bytearray()
        self._deliver(content)
        return True

    def _deliver(self, content: bytes) -> defer.Deferred[Any]:
        txn = self._txn
        assert txn is not None
        self._txn = None
        env = self._envelope(txn, content)
        self._waiting = True
        self._idle_period = None  # the spool's pace is not the client's fault
        d = defer.maybeDeferred(self.factory.submit, env)
        d.addCallbacks(
            self._delivered, self._not_delivered, callbackArgs=(env,), errbackArgs=(env,)
        )
        return d

    def _delivered(self, _: Any, env: Envelope) -> None:
        m = self.factory.metrics
        m.messages_accepted.inc()
        m.bytes_accepted.inc(len(env.data))
        self._resume(250, b"2.0.0 Ok: queued as " + env.msg_id.encode())

    def _not_delivered(self, failure: Any, env: Envelope) -> None:
        if failure.check(IntakeUnavailableError):
            # queue.on_unreachable: tempfail. Counted, logged once per outage.
            self.factory.metrics.messages_rejected.labels(reason="queue").inc()
            self._resume(451, b"4.3.0 Queue unavailable, try again later")
            return
        log.failure("spool append failed for {msg_id}", failure, msg_id=env.msg_id)
        self.factory.metrics.messages_rejected.labels(reason="spool").inc()
        self._resume(451, b"4.3.0 Error: queue file write error, try again")

    def _resume(self, code: int, message: bytes) -> None:
        self._waiting = False
        if self._state is CLOSED:
            return
        self.sendCode(code, message)
        self._set_idle(self.timeout)
        if self.factory.stopping:
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._abort(421, b"4.3.2 Service shutting down")
            return
        # The transport stays paused while held input holds another whole
        # transaction: a peer pipelining faster than the spool acks must not
        # grow the buffer by a read per reply.
        self._unhold()

    # -- DATA over the memory budget: the spill -------------------------------

    def _count_data(self, n: int) -> None:
        self.factory.data_in_memory += n - self._data_counted
        self._data_counted = n

    def _hold_or_spill(self) -> None:
        """After a read that did not end the DATA: keep it in memory, or move
        it to a spill file and keep only the bytes the next scan needs."""
        data = self._data
        spill = self._spill
        cfg = self.factory.config.smtp
        if self._data_overflow:
            if spill is not None:  # rejected anyway: no more writing
                spill.discard()
                self._spill = None
            self._count_data(len(data))
            return
        if spill is None:
            self._count_data(len(data))
            f = self.factory
            if f.spill is None or (
                len(data) <= cfg.data_spill_threshold
                and f.data_in_memory <= cfg.data_memory_budget
            ):
                return
            unstuff = b"\r\n" if self._crlf_client else b"\n"
            spill = self._spill = f.spill.open(unstuff, skip=len(_SENTINEL))
            spill.on_drained = self._spill_drained
        if self._data_base + len(data) - len(_SENTINEL) > cfg.max_message_size:
            # As _data_chunk does in memory: keep what can hold the terminator.
            self._data_overflow = True
            spill.discard()
            self._spill = None
            self._data = bytearray(data[-4:])
            self._count_data(4)
            return
        cut = len(data) - spill_mod.CONTEXT
        if cut > 0:
            spill.feed(bytes(memoryview(data)[:cut]))
            self._data_base += cut
            # A new, small bytearray: deleting from the front would keep the
            # old allocation.
            self._data = bytearray(memoryview(data)[cut:])
        self._count_data(len(self._data))
        if spill.pending_bytes > spill_mod.PENDING_MAX and not self._spill_paused:
            # The disk is slower than the peer: stop reading it meanwhile.
            self._spill_paused = True
            self.transport.pauseProducing()

    def _spill_drained(self) -> None:
        if self._spill_paused:
            self._spill_paused = False
            if not self._paused and self._state is not CLOSED:
                self.transport.resumeProducing()

    def _data_ended(self, data: bytearray, end: int) -> bool:
        """At the end of data (``end`` as _data_chunk found it): True if the
        message was spilled and is now on its way (or refused), False for
        _data_chunk to go on with one held in memory."""
        self._count_data(0)
        spill, self._spill = self._spill, None
        base, self._data_base = self._data_base, 0
        if spill is None:
            return False
        limit = self.factory.config.smtp.max_message_size
        if self._data_overflow or base + end > limit + len(_SENTINEL):
            spill.discard()
            self._data_overflow = True  # _data_chunk answers 552
            return False
        spill.feed(bytes(data[: end + 2] if self._crlf_client else data[: end + 1]))
        self._data = bytearray()
        # Input is held while the content is read back, as while the spool
        # writes it.
        self._waiting = True
        self._idle_period = None
        size = spill.size
        f = self.factory
        assert f.spill is not None
        d = defer.ensureDeferred(spill.content(f.config.smtp.data_memory_budget))
        d.addCallbacks(self._spill_read, self._spill_failed, callbackArgs=(size,))
        return True

    def _spill_read(self, content: bytes, size: int) -> None:
        spills = self.factory.spill
        assert spills is not None
        if self._state is CLOSED:  # never acknowledged: the client retries
            spills.unreserve(size)
            return
        self._waiting = False
        d = self._deliver(content)
        del content  # the envelope holds it until the spool has it
        d.addBoth(lambda r: (spills.unreserve(size), r)[1])

    def _spill_failed(self, failure: Any) -> None:
        log.failure("spilled DATA from {peer} lost", failure, peer=self.peer[0])
        self.factory.metrics.messages_rejected.labels(reason="spool").inc()
        self._txn = None
        self._resume(451, b"4.3.0 Error: queue file write error, try again")

    # -- PROXY protocol -------------------------------------------------------

    def _proxy_header(self) -> bool:
        try:
            # parse() reads the v2 length field first and waits for at most
            # proxy.V2_MAX bytes (TLVs included), v1 for proxy.V1_MAX.
            parsed = proxy.parse(self._buf)
        except proxy.ProxyError as e:
            self.factory.metrics.smtp_errors.labels(kind="proxy").inc()
            log.warn("bad PROXY header from {peer}: {err}", peer=self.peer[0], err=e)
            self._abort(421, b"4.7.0 Bad PROXY protocol header")
            return False
        if parsed is None:
            return False
        info, consumed = parsed
        del self._buf[:consumed]
        if info.source is not None:
            self.proxied_by = self.peer
            self.peer = info.source
            if info.destination is not None:
                self.local = info.destination
        self._state = COMMAND
        self._start()
        return True

    # -- metadata -------------------------------------------------------------

    def _local(self) -> tuple[str, int]:
        # A getsockname() call: only sessions that deliver need it.
        if self.local is None:
            self.local = _host_port(self.transport.getHost())
        return self.local

    def _tls_facts(self) -> str | None:
        if not self.startedTLS:
            return None
        conn: Any = getattr(getattr(self.transport, "protocol", None), "_tlsConnection", None)
        try:
            return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
        except Exception:  # noqa: BLE001 - the facts are best effort
            return "unknown"

    def _envelope(self, txn: Transaction, content: bytes) -> Envelope:
        f = self.factory
        now = f.clock.seconds()
        node = f.config.node
        msg_id = new_message_id(node, now)
        mail_from = _text(txn.mail_from)
        rcpts = [_text(a) for a, _ in txn.rcpts]
        tls = self._tls_facts()
        helo = _text(self._helo_arg) if self._helo_arg is not None else None
        peer_host, peer_port = self.peer
        local_host, local_port = self._local()
        rdns = self.rdns
        proto: str | None = None
        client, via = self._attribution(content)
        relay_field: str | None = None
        if via:
            # From a trusted relay: Peer, Rdns and Helo describe the original
            # client; Relay names the relay and how the client was learnt.
            own_helo = self._relay_helo if via == "xclient" else self._helo_arg
            relay_helo = _text(own_helo) if own_helo else "-"
            relay_field = f"{peer_host} {peer_port} {relay_helo} {via}"
            self.dialect.flags.add("relayed")  # the dialect is the relay's, not the bot's
        if client is not None and client.addr:
            peer_host, peer_port = client.addr, client.port
            rdns, helo, proto = client.name, client.helo, client.proto
            if via == "xclient" and client.destaddr:
                local_host, local_port = client.destaddr, client.destport
        self._xforward = None  # XFORWARD_README: reset after each transaction
        meta: dict[str, list[str]] = {
            "id": [msg_id],
            "node": [node],
            "session": [self.session_id],
            "peer": [f"{peer_host} {peer_port}"],
            "local": [f"{local_host} {local_port}"],
        }
        if self.proxied_by:
            meta["proxy"] = [f"{self.proxied_by[0]} {self.proxied_by[1]}"]
        if relay_field is not None:
            meta["relay"] = [relay_field]
        if rdns:
            meta["rdns"] = [rdns]
        if helo is not None:
            meta["helo"] = [helo]
        if tls:
            meta["tls"] = [tls]
        meta["mail_from"] = [_path_field(mail_from, txn.params)]
        meta["rcpt"] = [_path_field(r, p) for r, (_, p) in zip(rcpts, txn.rcpts, strict=True)]
        domains = dict.fromkeys(r.rpartition("@")[2].lower() for r in rcpts if "@" in r)
        if domains:
            meta["domain"] = list(domains)
        if txn.feed:
            meta["feed"] = [txn.feed]
        meta["connected"] = [iso_time(self.connected_at)]
        meta["received"] = [iso_time(now)]
        meta["size"] = [str(len(content))]
        meta["dialect"] = [self.dialect.render()]
        first = (self.first_command_at or now) - self.connected_at
        meta["timing"] = [
            f"first-cmd={bucket(first)} data={bucket(now - self.data_started_at)} "
            f"session={bucket(now - self.connected_at)}"
        ]
        with_ = "ESMTP" if self._helo_verb == b"EHLO" else "SMTP"
        if self.startedTLS:
            with_ += "S"
        if proto:
            with_ = proto  # as the relay received it (Postfix does the same)
        # Pieces between folds, kept apart so that a CR LF TAB a sender or
        # relay put in a value is escaped, not taken for a fold.
        received = [
            f"from {helo or 'unknown'} ({rdns or 'unknown'} [{peer_host}])",
            f"by {f.host_text} (spamtrap) with {with_} id {msg_id}",
            f"(envelope-from <{mail_from}>)",
            f"for <{rcpts[0]}>; {rfc2822_date(now)}",  # last: split_block ends the block here
        ]
        return Envelope(
            msg_id=msg_id,
            received_at=now,
            mail_from=mail_from,
            rcpts=rcpts,
            data=content,
            feed=txn.feed,
            meta=meta,
            received=received,
        )


def _in_networks(host: str, networks: list[Any]) -> bool:
    """Whether the address ``host`` is in one of ``networks``; an IPv4-mapped
    IPv6 address counts as its IPv4 one (a dual-stack listener sees IPv4
    peers so)."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class TrapSMTPFactory(protocol.ServerFactory):
    """Builds sessions; holds what they share: config, limits, the spool hand-off."""

    def __init__(
        self,
        config: Config,
        submit: Callable[[Envelope], defer.Deferred[Any]],
        metrics: Metrics,
        clock: Any,
        tls_context: Any = None,
        resolve_ptr: Callable[[str], defer.Deferred[str]] | None = None,
        spill: SpillDir | None = None,
    ) -> None:
        self.config = config
        # Where DATA over smtp.data_memory_budget goes; None: kept in memory.
        self.spill = spill
        self.data_in_memory = 0  # bytes of unfinished DATA held, all sessions
        self.submit = submit
        self.metrics = metrics
        self.clock = clock
        name = config.smtp.hostname
        self.host = name.encode("idna") if name.isascii() else b"localhost"
        self.host_text = self.host.decode("ascii")
        # by (whether STARTTLS is offered, whether the peer is a trusted relay)
        self.ehlo_replies: dict[tuple[bool, bool], bytes] = {}
        # The longest command line, its line end included (longer: 500, dropped).
        self.buffer_cap = max(config.smtp.max_command_line, 512)
        self.tls_context = tls_context
        self.resolve_ptr = resolve_ptr
        self.traps = TrapMatcher(config.traps, config.feeds)
        networks = config.smtp.proxy_protocol.trusted_networks
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.relays = [ipaddress.ip_network(n, strict=False) for n in config.smtp.trusted_relays]
        self.sessions: set[TrapSMTP] = set()
        metrics.connections_open.set_function(lambda: len(self.sessions))  # read at scrape time
        self.per_ip: dict[str, int] = {}
        self.stopping = False
        self._idle: defer.Deferred[None] | None = None
        self._hard_timer: Any = None

    def buildProtocol(self, addr: Any) -> TrapSMTP:
        return TrapSMTP(self)

    def trusts_proxy(self, host: str) -> bool:
        """Whether ``host`` may send a PROXY header (proxy_protocol.trusted_networks)."""
        return _in_networks(host, self.trusted)

    def trusts_relay(self, host: str) -> bool:
        """Whether ``host`` is an MX relay whose word on the client counts."""
        return _in_networks(host, self.relays)

    def trusts_hop(self, host: str) -> bool:
        """Whether a Received line's from-address is a hop inside the relay
        chain: a trusted relay, or loopback (content filters such as amavis
        hand mail back to Postfix over loopback)."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback or any(ip in net for net in self.relays)

    def admit(self, session: TrapSMTP) -> str | None:
        """Host protection, not backpressure: returns a refusal reason or None.

        At connect only the total is checked: behind a trusted PROXY balancer
        the peer is the balancer until the header names the client, so the
        per-IP count waits for :meth:`admit_peer`.
        """
        if len(self.sessions) >= self.config.smtp.max_connections:
            return "max_connections"
        self.sessions.add(session)
        return None

    def admit_peer(self, session: TrapSMTP) -> str | None:
        """Count the session against its client's address (after any PROXY
        header); a refusal reason or None. Trusted relays are not counted:
        they carry many clients, and limit each one themselves (Postfix's
        smtpd_client_connection_count_limit)."""
        limit = self.config.smtp.max_connections_per_ip
        host = session.peer[0]
        if not limit or self.trusts_relay(host):
            return None
        key = client_key(host)
        n = self.per_ip.get(key, 0)
        if n >= limit:
            return "max_connections_per_ip"
        self.per_ip[key] = n + 1
        session._counted_as = key
        return None

    def release(self, session: TrapSMTP) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        key = session._counted_as
        if key is not None:
            session._counted_as = None
            n = self.per_ip.get(key, 1) - 1
            if n > 0:
                self.per_ip[key] = n
            else:
                self.per_ip.pop(key, None)
        if not self.sessions and self._idle is not None:
            self._finish_shutdown()

    def shutdown(self) -> defer.Deferred[None]:
        """Stop taking mail: close idle sessions now and busy ones after
        their reply; after ``smtp.stop_grace`` close every session with 421.
        Fires once every session is gone (bounded: see _hard_close)."""
        self.stopping = True
        grace = self.config.smtp.stop_grace
        for s in list(self.sessions):
            s.shutdown(grace)
        if not self.sessions:
            return defer.succeed(None)
        self._idle = defer.Deferred()
        # A peer that reads nothing keeps a closing connection open until its
        # write buffer drains: after the grace and a little more, cut it.
        self._hard_timer = self.clock.callLater(grace + HARD_CLOSE_DELAY, self._hard_close)
        return self._idle

    def _hard_close(self) -> None:
        self._hard_timer = None
        for s in list(self.sessions):
            log.warn(
                "session {sid} from {peer} did not close on stop; aborting it",
                sid=s.session_id,
                peer=s.peer[0],
            )
            s.transport.abortConnection()
            # abortConnection reports connectionLost later; do not wait for it.
            self.release(s)

    def _finish_shutdown(self) -> None:
        t, self._hard_timer = self._hard_timer, None
        if t is not None and t.active():
            t.cancel()
        d, self._idle = self._idle, None
        if d is not None:
            d.callback(None)
