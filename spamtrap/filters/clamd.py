"""Stage "clamd": ClamAV's daemon over its INSTREAM protocol.

The client is a plain Twisted protocol, so a scan never holds a thread while
it waits: the stage (which runs in the filter pool) hands the message to the
reactor and blocks only its own worker. Scans are bounded in number (a
DeferredSemaphore) and in time (a timer on the injected clock). A clamd that
is down, stalled or failing is not allowed to lose mail or stop the pipeline:
``on_error`` says whether such a message is kept or discarded, and the stage
counts every such error in ``errors``.

Protocol (clamd(8)): ``zINSTREAM\\0``, then chunks of a 4-byte big-endian
length and the data, then a zero length; the reply is ``stream: OK\\0``,
``stream: <name> FOUND\\0`` or ``<message> ERROR\\0``. ``zPING\\0`` is
answered ``PONG\\0``.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from spamtrap.config import ClamdConfig, Config
from spamtrap.filters import Discard, Keep
from spamtrap.message import Envelope

CHUNK = 64 * 1024  # well below clamd's StreamMaxLength (25 MiB by default)
MAX_REPLY = 4096  # a reply is one short line; more is not clamd
LOG_INTERVAL = 60.0  # seconds between two logged errors

log = Logger()


class ClamdError(Exception):
    """clamd could not give a verdict: down, stalled, or it said ERROR."""


class ClamdProtocol(Protocol):
    """One clamd command on one connection; ``done`` fires with the reply
    (without its NUL) or fails with ClamdError.

    It fires once the connection is closed, not when the reply is in, so a
    client that waits for ``done`` never holds more connections than it
    allows itself.
    """

    def __init__(self, command: bytes, payload: bytes | None = None, address: str = "") -> None:
        self.command = command
        self.payload = payload
        self.address = address
        self.done: Deferred[bytes] = Deferred()
        self._buffer = b""
        self._result: bytes | ClamdError | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"z" + self.command + b"\0")
        if self.payload is not None:
            data = self.payload
            for start in range(0, len(data), CHUNK):
                chunk = data[start : start + CHUNK]
                transport.writeSequence([len(chunk).to_bytes(4, "big"), chunk])
            transport.write(b"\0\0\0\0")

    def dataReceived(self, data: bytes) -> None:
        if self._result is not None:
            return
        self._buffer += data
        reply, nul, _ = self._buffer.partition(b"\0")
        if nul:
            self._result = reply
        elif len(self._buffer) > MAX_REPLY:
            self._result = ClamdError(
                f"clamd at {self.address}: reply too long: {self._buffer[:80]!r}"
            )
        else:
            return
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return  # timed out
        if isinstance(self._result, bytes):
            self.done.callback(self._result)
        else:
            self.done.errback(
                self._result
                or ClamdError(f"clamd at {self.address} closed the connection without a reply")
            )

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


def parse_reply(reply: bytes, address: str = "") -> str | None:
    """The virus name in an INSTREAM reply, or None if clean.
    Raises ClamdError for an ERROR or anything unexpected."""
    text = reply.decode("utf-8", "replace").strip()
    if text == "stream: OK":
        return None
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        return text[len("stream: ") : -len(" FOUND")]
    raise ClamdError(f"clamd at {address} said {text!r}")


def endpoint(cfg: ClamdConfig, reactor: Any) -> Any:
    """The IStreamClientEndpoint for clamd's unix socket or TCP address."""
    if cfg.socket:
        return UNIXClientEndpoint(reactor, cfg.socket)
    try:
        ip = ipaddress.ip_address(cfg.host)
    except ValueError:
        return HostnameEndpoint(reactor, cfg.host, cfg.port)
    # An address literal needs no resolver.
    if ip.version == 4:
        return TCP4ClientEndpoint(reactor, cfg.host, cfg.port)
    return TCP6ClientEndpoint(reactor, cfg.host, cfg.port)


class ClamdClient:
    """Scans byte strings with clamd, at most ``max_concurrency`` at once."""

    def __init__(self, cfg: ClamdConfig, reactor: Any, clock: Any = None) -> None:
        self.endpoint = endpoint(cfg, reactor)
        self.clock = clock if clock is not None else reactor  # IReactorTime
        self.timeout = cfg.timeout
        self.address = cfg.socket or f"{cfg.host}:{cfg.port}"
        self.semaphore = DeferredSemaphore(cfg.max_concurrency)

    def scan(self, data: bytes) -> Deferred[str | None]:
        """The virus name clamd finds in ``data``, or None; ClamdError if
        there is no verdict."""
        d = self.semaphore.run(self._command, b"INSTREAM", data)
        return d.addCallback(parse_reply, self.address)

    def ping(self) -> Deferred[bool]:
        """True when clamd answers PONG (a health check; also limited)."""
        d = self.semaphore.run(self._command, b"PING")
        return d.addCallback(lambda reply: reply == b"PONG")

    def _command(self, command: bytes, payload: bytes | None = None) -> Deferred[bytes]:
        proto = ClamdProtocol(command, payload, self.address)
        connecting = connectProtocol(self.endpoint, proto)

        def connect_failed(f: Failure) -> None:
            if not proto.done.called:
                proto.done.errback(
                    ClamdError(f"cannot connect to clamd at {self.address}: {f.getErrorMessage()}")
                )

        connecting.addErrback(connect_failed)

        def timed_out() -> None:
            # Fail first, so the cancelled connect below does not say why.
            proto.done.errback(
                ClamdError(f"clamd at {self.address} gave no answer within {self.timeout:g}s")
            )
            connecting.cancel()
            proto.abort()

        timer = self.clock.callLater(self.timeout, timed_out)

        def finished(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        proto.done.addBoth(finished)
        return proto.done


class ClamdStage:
    """Discards what clamd finds; on clamd errors, follows ``on_error``."""

    name = "clamd"

    def __init__(self, client: ClamdClient, reactor: Any, on_error: str = "keep") -> None:
        self.client = client
        self.reactor = reactor
        self.on_error = on_error
        self.errors = 0  # verdicts clamd could not give, for /metrics
        self._lock = threading.Lock()
        self._logged_at: float | None = None
        self._unlogged = 0

    def __call__(self, env: Envelope) -> Discard | Keep | None:
        # Runs in a filter worker thread, never in the reactor.
        try:
            name: str | None = threads.blockingCallFromThread(
                self.reactor,
                self.client.scan,  # type: ignore[arg-type]
                env.data,
            )
        except ClamdError as e:
            self._failed(env, e)
            return Discard("clamd-error") if self.on_error == "discard" else Keep("clamd-error")
        return Discard(f"clamd:{name}") if name else None

    def _failed(self, env: Envelope, error: ClamdError) -> None:
        now = self.client.clock.seconds()
        with self._lock:
            self.errors += 1
            if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
                self._unlogged += 1
                return
            self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
            total = self.errors
        # One line a minute at most: a dead clamd must not flood the log.
        log.error(
            "clamd scan of {msg_id} failed ({policy} it): {error}; {unlogged} more failed "
            "since the last report, {errors} in all",
            msg_id=env.msg_id,
            policy="kept" if self.on_error == "keep" else "discarded",
            error=error,
            unlogged=unlogged,
            errors=total,
        )


def make(cfg: Config, reactor: Any) -> ClamdStage | None:
    c = cfg.filters.clamd
    if not c.enabled:
        return None
    return ClamdStage(ClamdClient(c, reactor), reactor, c.on_error)
