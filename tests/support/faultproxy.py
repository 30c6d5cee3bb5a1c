"""A loopback TCP proxy that cuts a link on demand, for fault tests.

CI has no root, iptables or network namespaces, so a partition between a
spamtrap node and Redis is made by pointing the node at this proxy and
switching its mode:

- ``pass``: forward bytes both ways;
- ``blackhole``: a dead network. Nothing is forwarded, bytes read are dropped
  and sockets stay open, so peers see timeouts rather than resets. New
  connections are accepted but never connected upstream;
- ``reset``: every connection is closed with RST, and new ones are reset as
  soon as they are accepted.

When the mode goes back to ``pass``, the connections that were blackholed
are reset: a real partition leaves their TCP state broken, so the client
has to reconnect.

One background thread runs a selector; the test thread drives other things.
set_mode() returns once that thread has applied the mode, so a test knows
the cut is in place before it goes on.
"""

from __future__ import annotations

import errno
import queue
import selectors
import socket
import struct
import threading
from types import TracebackType
from typing import Literal, cast

Mode = Literal["pass", "blackhole", "reset"]
MODES: tuple[Mode, ...] = ("pass", "blackhole", "reset")

_CHUNK = 65536
_BUFFER = 256 * 1024  # per direction; beyond it we stop reading (backpressure)
_STOP_TIMEOUT = 1.0
_COMMAND_TIMEOUT = 2.0
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_LISTENER = "listener"
_WAKE = "wake"


class _Side:
    """One socket of a proxied pair, with the bytes waiting to be written to it."""

    def __init__(self, pair: _Pair, sock: socket.socket) -> None:
        self.pair = pair
        self.sock = sock
        self.out = bytearray()
        self.eof = False  # it sent FIN: read nothing more from it
        self.shut = False  # we sent it FIN
        self.events = 0


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream) if upstream is not None else None
        self.connecting = upstream is not None
        self.blackholed = upstream is None
        self.closed = False

    def sides(self) -> list[_Side]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def peer(self, side: _Side) -> _Side:
        other = self.client if side is self.upstream else self.upstream
        assert other is not None, "a forwarding pair always has an upstream"
        return other


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN (SO_LINGER 0), and leave no TIME_WAIT."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already dead: closing is all that is left
    sock.close()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:port to an IPv4 upstream, with switchable faults."""

    def __init__(
        self, upstream: tuple[str, int], port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream
        self._address = (host, port)
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._connections = 0
        self._pairs: set[_Pair] = set()
        self._commands: queue.SimpleQueue[tuple[Mode, threading.Event]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False

    # -- the test thread's side --------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    @property
    def connections(self) -> int:
        """Connections accepted so far, in any mode."""
        with self._lock:
            return self._connections

    @property
    def active(self) -> int:
        """Proxied pairs that still hold an open socket."""
        with self._lock:
            return len(self._pairs)

    def start(self) -> FaultProxy:
        if self._closed or self._thread is not None:
            raise RuntimeError("a FaultProxy starts once")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A test may restart a proxy on the port a node is configured with.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self._address)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full pipe already means "wake up"
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, _READ, _LISTENER)
        self._sel.register(self._wake_r, _READ, _WAKE)
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; on return, the proxy thread has applied it."""
        if mode not in MODES:
            raise ValueError(f"unknown fault proxy mode {mode!r}; expected one of {MODES}")
        thread = self._thread
        if thread is None or self._closed:
            with self._lock:
                self._mode = mode
            return
        done = threading.Event()
        self._commands.put((mode, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(
                f"fault proxy on port {self.port} did not apply mode {mode!r}"
                f" (thread alive: {thread.is_alive()}, error: {self._error!r})"
            )

    def close(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake()
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop")
        assert self._wake_w is not None
        self._wake_w.close()
        if self._error is not None:
            raise RuntimeError("fault proxy thread failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wake(self) -> None:
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending) or the thread has stopped

    # -- the proxy thread --------------------------------------------------

    def _run(self) -> None:
        sel = cast(selectors.BaseSelector, self._sel)
        try:
            while not self._stop.is_set():
                # No timeout: every state change comes with a wake-up byte.
                for key, mask in sel.select():
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        self._run_commands()
                    else:
                        self._on_event(key.data, mask)
        except BaseException as e:
            self._error = e  # close() raises it: a broken proxy must fail the test
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, rst=True)
        # _wake_w stays open until close() has joined this thread: closing it
        # here could free its fd for reuse while another thread sends to it.
        for sock in (self._listener, self._wake_r):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()

    def _run_commands(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                mode, done = self._commands.get_nowait()
            except queue.Empty:
                return
            self._apply_mode(mode)
            done.set()

    def _apply_mode(self, mode: Mode) -> None:
        with self._lock:
            self._mode = mode
        for pair in list(self._pairs):
            if mode == "reset" or (mode == "pass" and pair.blackholed):
                self._close_pair(pair, rst=True)
            elif mode == "blackhole" and not pair.blackholed:
                pair.blackholed = True
                for side in pair.sides():
                    side.out.clear()  # nothing is written any more
                self._update(pair)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return  # the client gave up before we got to it
        with self._lock:
            self._connections += 1
            mode = self._mode
        sock.setblocking(False)
        if mode == "reset":
            _reset(sock)
            return
        upstream = None
        if mode == "pass":
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            err = upstream.connect_ex(self.upstream)
            if err not in (0, errno.EINPROGRESS):
                upstream.close()
                _reset(sock)  # upstream is down: the client sees what it would see
                return
        pair = _Pair(sock, upstream)
        with self._lock:
            self._pairs.add(pair)
        self._update(pair)

    def _on_event(self, side: _Side, mask: int) -> None:
        pair = side.pair
        if pair.closed:
            return  # closed by an earlier event of the same select() batch
        # A blackholed upstream that is still connecting is only read and dropped.
        if pair.connecting and side is pair.upstream and not pair.blackholed:
            if side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close_pair(pair, rst=True)  # refused: the client is reset
                return
            pair.connecting = False
        if mask & _READ:
            self._read(side)
        if mask & _WRITE and not pair.closed and not pair.blackholed:
            self._write(side)
        if not pair.closed:
            self._settle(pair)

    def _read(self, side: _Side) -> None:
        pair = side.pair
        try:
            data = side.sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if pair.blackholed:
            # Bytes read on a dead network are lost. On EOF or error, stop
            # reading but keep the socket: no close may cross a dead network.
            if not data:
                side.eof = True
            return
        if data is None:
            self._close_pair(pair, rst=True)
        elif not data:
            side.eof = True
        else:
            pair.peer(side).out += data

    def _write(self, side: _Side) -> None:
        try:
            sent = side.sock.send(side.out)
        except BlockingIOError:
            return
        except OSError:
            self._close_pair(side.pair, rst=True)
            return
        del side.out[:sent]

    def _settle(self, pair: _Pair) -> None:
        """Pass on half-closes, end finished pairs, and choose what to wait for."""
        if not pair.blackholed and not pair.connecting:
            for side in pair.sides():
                if pair.peer(side).eof and not side.out and not side.shut:
                    try:
                        side.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        self._close_pair(pair, rst=True)
                        return
                    side.shut = True
            if all(side.shut for side in pair.sides()):
                self._close_pair(pair, rst=False)
                return
        self._update(pair)

    def _update(self, pair: _Pair) -> None:
        for side in pair.sides():
            if pair.blackholed:
                # Read and drop, so the peer's sends do not stall on a full buffer.
                events = 0 if side.eof else _READ
            elif pair.connecting and side is pair.upstream:
                events = _WRITE  # writable once the connect has finished
            else:
                peer = pair.peer(side)
                events = _WRITE if side.out else 0
                if not side.eof and len(peer.out) < _BUFFER:
                    events |= _READ
            self._watch(side, events)

    def _watch(self, side: _Side, events: int) -> None:
        assert self._sel is not None
        if events == side.events:
            return
        if side.events == 0:
            self._sel.register(side.sock, events, side)
        elif events == 0:
            self._sel.unregister(side.sock)
        else:
            self._sel.modify(side.sock, events, side)
        side.events = events

    def _close_pair(self, pair: _Pair, rst: bool) -> None:
        for side in pair.sides():
            self._watch(side, 0)
            if rst:
                _reset(side.sock)
            else:
                side.sock.close()
        pair.closed = True
        with self._lock:
            self._pairs.discard(pair)
