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
(the session is in REPLY_PENDING) and the transport paused (``_paused``)
until no whole transaction is left in the held bytes, so every pipelined
transaction is answered in order and submitted once.

The session is split by concern; this module keeps its lifecycle, timers,
the byte stream and the hand-off to the spool, and re-exports the rest:

- :mod:`spamtrap.intake.state`: the session states and their legal moves;
- :mod:`spamtrap.intake.commands`: the SMTP verbs (a mixin);
- :mod:`spamtrap.intake.relay_commands`: XFORWARD and XCLIENT from trusted relays (a mixin);
- :mod:`spamtrap.intake.data`: DATA, its end, and the spill (a mixin);
- :mod:`spamtrap.intake.facts`: what the session knows of itself, gathered
  for the envelope (a mixin);
- :mod:`spamtrap.intake.envelope`: the envelope, a pure function of the
  session's facts and the transaction;
- :mod:`spamtrap.intake.limits`: what sessions share, the connection limits
  and the stop (the factory's base).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp

from spamtrap.errors import IntakeUnavailableError
from spamtrap.intake import proxy
from spamtrap.intake.commands import Commands, format_reply
from spamtrap.intake.data import DataIntake
from spamtrap.intake.envelope import Transaction
from spamtrap.intake.facts import SessionMetadata, host_port
from spamtrap.intake.limits import SessionHost, client_key
from spamtrap.intake.parse import Dialect
from spamtrap.intake.relay_commands import RelayCommands
from spamtrap.intake.replies import send_reply
from spamtrap.intake.spill import Spill
from spamtrap.intake.state import HOLDING, SessionState, check_move
from spamtrap.message import Envelope, new_session_id

__all__ = [
    "SessionState",
    "Transaction",
    "TrapSMTP",
    "TrapSMTPFactory",
    "client_key",
]

log = Logger()

CONNECTING = SessionState.CONNECTING
PROXY = SessionState.PROXY
GREETING = SessionState.GREETING
COMMAND = SessionState.COMMAND
DATA = SessionState.DATA
REPLY_PENDING = SessionState.REPLY_PENDING
CLOSED = SessionState.CLOSED


class TrapSMTP(Commands, RelayCommands, DataIntake, SessionMetadata, smtp.ESMTP):
    """One SMTP session; the mixins before smtp.ESMTP override its verbs."""

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
        self._crlf_client = False  # a command line ended in CRLF: see _data_chunk
        self._discarding = False  # inside an over-long command line: drop to its LF
        self._state = CONNECTING  # moved only by _move
        # Whether we paused the transport: a transport fact, not a state. It
        # is set only when input actually arrives in a HOLDING state (saving
        # two epoll calls per message otherwise), and it outlives the state
        # that set it: _unhold keeps it across a REPLY_PENDING -> COMMAND ->
        # REPLY_PENDING run of pipelined transactions.
        self._paused = False
        self._txn: Transaction | None = None
        self._helo_verb = b""
        self._helo_arg: bytes | None = None
        # The session's one timer, and the deadlines it serves.
        self._timer: Any = None
        self._greet_timer: Any = None
        self._session_deadline = math.inf
        self._stop_deadline = math.inf  # set by shutdown()
        # DATA over the memory budget goes to a spill file (spamtrap/intake/spill.py):
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
        self.peer = host_port(self.transport.getPeer())
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
            self._move(PROXY)
            return
        self._start()

    def _move(self, new: SessionState) -> None:
        """The one place the session changes state; refuses an illegal move."""
        check_move(self.session_id, self._state, new)
        self._state = new

    def _refuse(self, reason: str) -> None:
        self.factory.metrics.connections_refused.labels(reason=reason).inc()
        send_reply(self.transport, b"421 4.7.0 %s Too many connections, try later\r\n" % self.host)
        self._move(CLOSED)
        self.transport.loseConnection()

    def _start(self) -> None:
        f = self.factory
        self._move(GREETING)
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
        self._move(COMMAND)
        self.sendCode(220, self.greeting())
        self._unhold()  # an early talker's input was held

    def sendCode(self, code: int, message: bytes = b"") -> None:
        # One write per reply; the parent writes every line of it separately.
        send_reply(self.transport, format_reply(code, message))

    def greeting(self) -> bytes:
        return self.host + b" ESMTP spamtrap"

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._move(CLOSED)
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
            if self._state is not REPLY_PENDING:
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
        self._move(CLOSED)
        self.transport.loseConnection()

    def shutdown(self, grace: float) -> None:
        """The service is stopping: close idle sessions now, busy ones after
        their reply, and whatever is left after ``grace`` seconds (a client
        trickling its DATA must not hold the stop)."""
        if self._state is not DATA and self._state is not REPLY_PENDING:
            self._abort(421, b"4.3.2 Service shutting down")
            return
        now = self.clock.seconds()
        self._stop_deadline = now + grace
        self._arm(now, self._stop_deadline)

    # -- the byte stream ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state is CLOSED:
            return
        self._idle_since = self.clock.seconds()
        if state is GREETING:
            self.dialect.flags.add("early-talk")
        self._buf += data
        if state in HOLDING:
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
        while self._buf:
            state = self._state
            if state is COMMAND:
                if not self._command_line():
                    return
            elif state is DATA:
                if not self._data_chunk():
                    return
            elif state is PROXY:
                if not self._proxy_header():
                    return
            else:  # HOLDING or CLOSED
                return

    def _unhold(self) -> None:
        """Run the held input; read from the peer again once nothing is pending."""
        self._pump()
        if self._paused and self._state is not REPLY_PENDING and self._state is not CLOSED:
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

    def _deliver(self, content: bytes) -> defer.Deferred[Any]:
        txn = self._txn
        assert txn is not None
        env = self._envelope(txn, content)
        self._end_transaction()
        self._move(REPLY_PENDING)
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
        if self._state is CLOSED:
            return
        self._move(COMMAND)
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
        self._start()
        return True


class TrapSMTPFactory(SessionHost):
    """Builds sessions; holds what they share (see :class:`SessionHost`)."""

    # Twisted types a protocol's factory as Factory[Self]; the session types
    # its own precisely (SessionBase.factory), which that cannot express.
    def buildProtocol(self, addr: Any) -> TrapSMTP:  # type: ignore[override]
        return TrapSMTP(self)
