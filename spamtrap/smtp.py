"""The trap's ESMTP server, built on twisted.mail.smtp.ESMTP.

Twisted's server is written for a friendly MTA, not for spammers. This
subclass keeps its reply formatting, TLS and timeout machinery, and takes
over the byte stream itself (``dataReceived``), because the line-based
parent has defects a trap cannot live with (each override says which):

- an over-long line in DATA flips the parent back to command mode and runs the
  rest of the body as SMTP commands; here DATA is scanned as raw bytes for
  CRLF.CRLF and has no line limit short of the message size;
- input without CRLF grows the parent's buffer without bound (copied
  quadratically); here the command buffer is capped and answered with 421;
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
message: see architecture "Durability at 250".
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

from spamtrap import proxy
from spamtrap.config import Config
from spamtrap.message import Envelope, iso_time, new_message_id, new_session_id, rfc2822_date
from spamtrap.metrics import Metrics
from spamtrap.queue import QueueUnavailableError
from spamtrap.smtp_parse import Dialect, bucket, param_value, parse_path
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

    def __init__(self, factory: TrapSMTPFactory) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=factory.tls_context)
        self.factory = factory
        self.clock = factory.clock
        self.host = factory.host
        self.timeout = factory.config.smtp.timeouts.command  # type: ignore[assignment]
        self._buf = bytearray()
        self._data = bytearray()
        self._data_overflow = False
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
            f.metrics.connections_refused.labels(reason=refusal).inc()
            self.transport.write(b"421 4.7.0 %s Too many connections, try later\r\n" % self.host)
            self._state = CLOSED
            self.transport.loseConnection()
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

    def _start(self) -> None:
        f = self.factory
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
        self._pump()

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
        self.factory.release(self)

    # -- timeouts -------------------------------------------------------------

    def _set_idle(self, period: float | None) -> None:
        """Restart the idle clock: close after ``period`` seconds of silence
        (None: never, e.g. while the spool has the message)."""
        now = self.clock.seconds()
        self._idle_since = now
        self._idle_period = period
        if period is not None:
            self._arm(now, now + period)

    def _arm(self, now: float, deadline: float) -> None:
        # Only an earlier deadline moves the timer; a later one is noticed
        # when the timer fires, which then re-arms for it.
        deadline = min(deadline, self._session_deadline)
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
        if now >= self._session_deadline:
            self._abort(421, b"4.4.2 Session too long")
            return
        if self._idle_period is None:
            self._arm(now, math.inf)
            return
        idle_deadline = self._idle_since + self._idle_period
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

    def shutdown(self) -> None:
        """The service is stopping: close idle sessions now, busy ones after their reply."""
        if self._state is COMMAND and not self._waiting:
            self._abort(421, b"4.3.2 Service shutting down")

    # -- the byte stream ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state is CLOSED:
            return
        self._idle_since = self.clock.seconds()
        if not self._greeted and self._state is not PROXY:
            self.dialect.flags.add("early-talk")
        self._buf += data
        if self._waiting:
            # Hold further input until the reply is sent. Pausing only when
            # input actually comes (bots wait for the 250) saves two epoll
            # calls per message.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._pump()

    def _pump(self) -> None:
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
        if self._state is not CLOSED and len(self._buf) > self.factory.buffer_cap:
            self._abort(421, b"4.7.0 Too much input without a line end")

    def _command_line(self) -> bool:
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > self.factory.buffer_cap:
                self._abort(421, b"4.7.0 Line too long")
            return False
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
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
        return ext

    def _set_helo(self, verb: bytes, rest: bytes) -> None:
        self._helo_verb = verb.upper()
        self._helo_arg = rest.strip()
        self._txn = None

    def do_HELO(self, rest: bytes) -> None:
        self._set_helo(b"HELO", rest)
        self.sendCode(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        self._set_helo(b"EHLO", rest)
        # The reply depends only on the config and on whether STARTTLS is
        # offered: render it once per factory.
        offer_tls = bool(self.canStartTLS and not self.startedTLS)
        replies = self.factory.ehlo_replies
        reply = replies.get(offer_tls)
        if reply is None:
            reply = replies[offer_tls] = _reply(250, self.host + b"\n" + self.listExtensions())
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
        # RFC 3207 4.2: forget everything learnt before the handshake.
        self._helo_arg = None
        self._helo_verb = b""
        self._txn = None

    # -- DATA -----------------------------------------------------------------

    def _data_chunk(self) -> bool:
        """Move buffered bytes into the message; True once it has ended."""
        data = self._data
        start = max(len(data) - 4, 0)
        data += self._buf
        self._buf.clear()
        end = data.find(b"\r\n.\r\n", start)
        limit = self.factory.config.smtp.max_message_size
        if end < 0:
            if len(data) - len(_SENTINEL) > limit:
                # Past the limit: keep only what can still hold the terminator.
                self._data_overflow = True
                del data[:-4]
            return False
        self._buf += data[end + 5 :]
        self._state = COMMAND
        self._set_idle(self.timeout)
        if self._data_overflow or end > limit + len(_SENTINEL):
            self._txn = None
            self._data = bytearray()
            self.factory.metrics.messages_rejected.labels(reason="size").inc()
            self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
            return True
        # RFC 5321 4.5.2: drop the first period of every line that has one.
        content = bytes(data[: end + 2]).replace(b"\r\n.", b"\r\n")[len(_SENTINEL) :]
        self._data = bytearray()
        self._deliver(content)
        return True

    def _deliver(self, content: bytes) -> None:
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

    def _delivered(self, _: Any, env: Envelope) -> None:
        m = self.factory.metrics
        m.messages_accepted.inc()
        m.bytes_accepted.inc(len(env.data))
        self._resume(250, b"2.0.0 Ok: queued as " + env.msg_id.encode())

    def _not_delivered(self, failure: Any, env: Envelope) -> None:
        if failure.check(QueueUnavailableError):
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
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self.factory.stopping:
            self._abort(421, b"4.3.2 Service shutting down")
            return
        self._pump()

    # -- PROXY protocol -------------------------------------------------------

    def _proxy_header(self) -> bool:
        try:
            parsed = proxy.parse(bytes(self._buf[:600]))
        except proxy.ProxyError as e:
            self.factory.metrics.smtp_errors.labels(kind="proxy").inc()
            log.warn("bad PROXY header from {peer}: {err}", peer=self.peer[0], err=e)
            self._abort(421, b"4.7.0 Bad PROXY protocol header")
            return False
        if parsed is None:
            if len(self._buf) > 600:
                self._abort(421, b"4.7.0 Bad PROXY protocol header")
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
        meta: dict[str, list[str]] = {
            "id": [msg_id],
            "node": [node],
            "session": [self.session_id],
            "peer": [f"{peer_host} {peer_port}"],
            "local": [f"{local_host} {local_port}"],
        }
        if self.proxied_by:
            meta["proxy"] = [f"{self.proxied_by[0]} {self.proxied_by[1]}"]
        if self.rdns:
            meta["rdns"] = [self.rdns]
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
        received = (
            f"from {helo or 'unknown'} ({self.rdns or 'unknown'} [{peer_host}])\r\n"
            f"\tby {f.host_text} (spamtrap) with {with_} id {msg_id}\r\n"
            f"\t(envelope-from <{mail_from}>)\r\n"
            f"\tfor <{rcpts[0]}>; {rfc2822_date(now)}"
        )
        return Envelope(
            msg_id=msg_id,
            received_at=now,
            mail_from=mail_from,
            rcpts=rcpts,
            data=content,
            feed=txn.feed,
            meta=meta,
            received_line=received,
        )


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
    ) -> None:
        self.config = config
        self.submit = submit
        self.metrics = metrics
        self.clock = clock
        name = config.smtp.hostname
        self.host = name.encode("idna") if name.isascii() else b"localhost"
        self.host_text = self.host.decode("ascii")
        self.ehlo_replies: dict[bool, bytes] = {}  # by whether STARTTLS is offered
        # Input held without a line end before the session is cut off.
        self.buffer_cap = max(config.smtp.max_command_line, 512)
        self.tls_context = tls_context
        self.resolve_ptr = resolve_ptr
        self.traps = TrapMatcher(config.traps, config.feeds)
        networks = config.smtp.proxy_protocol.trusted_networks
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.sessions: set[TrapSMTP] = set()
        metrics.connections_open.set_function(lambda: len(self.sessions))  # read at scrape time
        self.per_ip: dict[str, int] = {}
        self.stopping = False
        self._idle: defer.Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> TrapSMTP:
        return TrapSMTP(self)

    def trusts_proxy(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def admit(self, session: TrapSMTP) -> str | None:
        """Host protection, not backpressure: returns a refusal reason or None."""
        cfg = self.config.smtp
        ip = session.peer[0]
        if len(self.sessions) >= cfg.max_connections:
            return "max_connections"
        if cfg.max_connections_per_ip and self.per_ip.get(ip, 0) >= cfg.max_connections_per_ip:
            return "max_connections_per_ip"
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, session: TrapSMTP) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        ip = session.peer[0] if session.proxied_by is None else session.proxied_by[0]
        n = self.per_ip.get(ip, 1) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)
        if not self.sessions and self._idle is not None:
            d, self._idle = self._idle, None
            d.callback(None)

    def shutdown(self) -> defer.Deferred[None]:
        """Stop taking mail: close idle sessions, let busy ones finish their reply."""
        self.stopping = True
        for s in list(self.sessions):
            s.shutdown()
        if not self.sessions:
            return defer.succeed(None)
        self._idle = defer.Deferred()
        return self._idle
