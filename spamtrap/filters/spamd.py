"""Stage "spamd": ask a real SpamAssassin whether a message is a bounce.

An optional second opinion next to the native "bounce" stage: spamd runs
its whole rule set, including VBounce's ANY_BOUNCE_MESSAGE, and manages
some 10 to 20 messages a second with 3 children, so it suits small traps
and audits.

The client speaks spamd's SPAMC protocol (``SYMBOLS SPAMC/1.5``) over TCP
without blocking the reactor. At most ``max_concurrency`` requests are in
flight (a DeferredSemaphore; match spamd's ``--max-children``), and each
fails after ``timeout`` seconds on the injected clock, time spent waiting
for a free slot included (keep it below ``filters.stage_budget``). The stage
itself runs in the filter thread pool and waits for the reactor-side client
with ``blockingCallFromThread``, so the reactor must be running.

When spamd fails or times out, ``on_error`` decides: ``keep`` (pass the
message on) or ``discard`` (``Discard("spamd-error")``). Errors are counted
in :attr:`SpamdStage.errors` and logged at most once a minute, with how many
were not logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from spamtrap.config import Config
from spamtrap.filters import Discard, Keep
from spamtrap.message import Envelope

# VBounce's rules; ANY_BOUNCE_MESSAGE is the meta of the other four.
BOUNCE_SYMBOLS = frozenset({
    "ANY_BOUNCE_MESSAGE", "BOUNCE_MESSAGE", "CRBOUNCE_MESSAGE", "VBOUNCE_MESSAGE",
    "OOOBOUNCE_MESSAGE",
})
# spamc does not send messages above 500 KB either (its -s default): spamd
# would take seconds over them, and bounces are small.
MAX_MESSAGE = 500 * 1024
MAX_REPLY = 64 * 1024  # a SYMBOLS reply is a few hundred bytes
LOG_INTERVAL = 60.0

log = Logger()


class SpamdError(Exception):
    """spamd answered with an error, or with something we cannot read."""


@dataclass
class SpamdResult:
    spam: bool
    score: float
    threshold: float
    symbols: list[str] = field(default_factory=list)


def parse_reply(reply: bytes) -> SpamdResult:
    """Parse a complete SPAMD reply to SYMBOLS; raises SpamdError."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        raise SpamdError(f"incomplete reply: {reply[:80]!r}")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"SPAMD/"):
        raise SpamdError(f"not a spamd reply: {lines[0][:80]!r}")
    if status[1] != b"0":
        raise SpamdError(f"spamd said: {lines[0][:200].decode('ascii', 'replace')}")
    spam, score, threshold = False, 0.0, 0.0
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = _int(value)
        elif name == b"spam":
            # "Spam: True ; 15.0 / 5.0"
            flag, _, scores = value.partition(b";")
            spam = flag.strip().lower() in (b"true", b"yes")
            got, _, need = scores.partition(b"/")
            score, threshold = _float(got), _float(need)
    if length is not None:
        if len(body) < length:
            raise SpamdError(f"reply body cut short: {len(body)} of {length} bytes")
        body = body[:length]
    symbols = [s.strip() for s in body.decode("ascii", "replace").split(",") if s.strip()]
    return SpamdResult(spam, score, threshold, symbols)


def _int(value: bytes) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise SpamdError(f"bad number {value[:40]!r}")


def _float(value: bytes) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise SpamdError(f"bad number {value[:40]!r}")


class SpamcProtocol(Protocol):
    """One SYMBOLS request; ``finished`` fires with the SpamdResult.

    spamd closes the connection after its reply, so the reply is complete
    when the connection ends, or earlier once Content-length bytes are in.
    """

    transport: Any  # zope interfaces do not type-check as attributes without a plugin

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buffer = bytearray()
        self.finished: defer.Deferred[SpamdResult] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(
            b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(self.data)
        )
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.buffer += data
        if len(self.buffer) > MAX_REPLY:
            self._finish(Failure(SpamdError(f"reply longer than {MAX_REPLY} bytes")))
            self.transport.abortConnection()
            return
        result = self._complete()
        if result is not None:
            self._finish(result)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        try:
            result = parse_reply(bytes(self.buffer))
        except SpamdError as e:
            self._finish(Failure(SpamdError(f"{e} (connection lost: {reason.value})")))
        else:
            self._finish(result)

    def _complete(self) -> SpamdResult | None:
        """The result, if the reply is complete before the connection ends."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            return None  # no length: wait for the connection to end
        nl = head.find(b"\r\n", at + 2)
        length = _int(head[at + 17 : nl if nl >= 0 else len(head)])
        if len(self.buffer) - end - 4 < length:
            return None
        return parse_reply(bytes(self.buffer))

    def _finish(self, result: SpamdResult | Failure) -> None:
        if not self.finished.called:
            if isinstance(result, Failure):
                self.finished.errback(result)
            else:
                self.finished.callback(result)

    def _cancel(self, d: defer.Deferred[SpamdResult]) -> None:
        # A timeout: drop the connection; the Deferred fails with CancelledError.
        if self.transport is not None:
            self.transport.abortConnection()


class SpamdClient:
    """Asks spamd for the rule names that hit a message, without blocking."""

    def __init__(
        self,
        endpoint: Any,
        clock: Any,
        timeout: float,
        max_concurrency: int,
    ) -> None:
        """``endpoint`` is an IStreamClientEndpoint to spamd, ``clock`` an
        IReactorTime (typed Any: mypy without the zope plugin does not see
        that a reactor or task.Clock provides them)."""
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.semaphore = defer.DeferredSemaphore(max(1, max_concurrency))

    def symbols(self, data: bytes) -> defer.Deferred[SpamdResult]:
        """Fires with a SpamdResult; fails with SpamdError, a connection
        error, or TimeoutError after ``timeout`` seconds, waiting for a free
        slot included: the stage must answer within its budget."""
        d = self.semaphore.run(self._ask, data)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _ask(self, data: bytes) -> defer.Deferred[SpamdResult]:
        protocol = SpamcProtocol(data)
        d: defer.Deferred[Any] = connectProtocol(self.endpoint, protocol)
        d.addCallback(lambda _: protocol.finished)
        return d


class SpamdStage:
    name = "spamd"

    def __init__(
        self,
        ask: Callable[[bytes], SpamdResult],
        on_error: str,
        clock: Any,
        where: str = "",
    ) -> None:
        """``ask`` blocks until spamd answers (it is called in a worker
        thread); ``clock`` is an IReactorTime, for rate-limiting the log;
        ``where`` names the server in log lines."""
        if on_error not in ("keep", "discard"):
            raise ValueError(f"spamd on_error must be keep or discard, not {on_error!r}")
        self.ask = ask
        self.on_error = on_error
        self.clock = clock
        self.where = where
        self.errors = 0
        self._lock = threading.Lock()
        self._last_log = float("-inf")
        self._unlogged = 0

    def __call__(self, env: Envelope) -> Discard | Keep | None:
        if len(env.data) > MAX_MESSAGE:
            return None
        try:
            result = self.ask(env.data)
        except Exception as e:  # noqa: BLE001 - any failure of spamd follows on_error
            self._error(env, e)
            return Discard("spamd-error") if self.on_error == "discard" else Keep("spamd-error")
        if BOUNCE_SYMBOLS.intersection(result.symbols):
            return Discard("spamd:ANY_BOUNCE_MESSAGE")
        return None

    def _error(self, env: Envelope, error: Exception) -> None:
        now = self.clock.seconds()
        with self._lock:
            self.errors += 1
            if now - self._last_log < LOG_INTERVAL:
                self._unlogged += 1
                return
            self._last_log, unlogged, self._unlogged = now, self._unlogged, 0
        log.warn(
            "spamd {where}: {error!r} for message {msg_id}; {action} it"
            " ({unlogged} more errors since the last report)",
            where=self.where,
            error=error,
            msg_id=env.msg_id,
            action=self.on_error,
            unlogged=unlogged,
        )


def make(cfg: Config, reactor: Any) -> SpamdStage | None:
    conf = cfg.filters.spamd
    if not conf.enabled:
        return None
    endpoint = TCP4ClientEndpoint(reactor, conf.host, conf.port, timeout=conf.timeout)
    client = SpamdClient(endpoint, reactor, conf.timeout, conf.max_concurrency)

    def ask(data: bytes) -> SpamdResult:
        ask_spamd: Callable[[bytes], Any] = client.symbols
        result: SpamdResult = blockingCallFromThread(reactor, ask_spamd, data)
        return result

    return SpamdStage(ask, conf.on_error, reactor, f"{conf.host}:{conf.port}")
