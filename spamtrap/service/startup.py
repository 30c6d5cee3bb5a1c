"""What a node acquires when it starts, one ``IService`` per concern.

``makeService`` only builds plain objects: no directory is created, no
certificate made or read, no list file read, no signal handler installed
and no reactor trigger added until the service tree starts. The services
here are the children of :class:`spamtrap.service.compose.SpamtrapService` that do
those things; they start in the order they were added and stop in reverse.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from spamtrap.config import TLSConfig
from spamtrap.filters.lists import ListsStage, WatchReactor
from spamtrap.intake import rdns, tls
from spamtrap.interfaces import ReactorFromThreads, ReactorTime

log = Logger()


class ListsReloader(service.Service):
    """Reads the discard-list files at start, then reloads them every
    ``reload_interval`` and on SIGHUP (through ``hup``); stops at stop."""

    name = "lists-reloader"

    def __init__(
        self,
        stage: ListsStage,
        interval: float,
        reactor: WatchReactor,
        *,
        hup: SighupHandler | None = None,
        clock: ReactorTime | None = None,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None,
    ) -> None:
        """``clock`` and ``run_in_thread`` replace the reactor's timers and
        thread pool for the periodic check (see ListsStage.watch)."""
        self.stage = stage
        self.interval = interval
        self.reactor = reactor
        self.hup = hup
        self.clock = clock
        self.run_in_thread = run_in_thread

    def startService(self) -> None:
        super().startService()
        # Before intake (and, under twistd, before the reactor runs): a
        # blocking read of small files is harmless here.
        self.stage.reload()
        if self.stage.files:
            self.stage.watch(self.reactor, self.interval, self.clock, self.run_in_thread)
            if self.hup is not None:
                self.hup.listeners.append(self.stage.reload_soon)

    def stopService(self) -> defer.Deferred[None] | None:
        if self.hup is not None and self.stage.reload_soon in self.hup.listeners:
            self.hup.listeners.remove(self.stage.reload_soon)
        self.stage.unwatch()
        return super().stopService()


class SighupHandler(service.Service):
    """The process's one SIGHUP handler. Without one, SIGHUP would kill the
    process (no drain, no clean stop). It says what SIGHUP does and calls
    each of ``listeners`` (the discard lists' reload) in the reactor thread;
    at stop the previous handler is put back."""

    name = "sighup"

    def __init__(self, reactor: ReactorFromThreads) -> None:
        self.reactor = reactor
        self.listeners: list[Callable[[], object]] = []
        self._handler: Any = None
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        # Signal handlers can only be set from the main thread.
        if threading.current_thread() is not threading.main_thread():
            return

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reactor.callFromThread(self.hup)

        self._previous = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, on_hup)
        self._handler = on_hup

    def hup(self) -> None:
        """What SIGHUP does, in the reactor thread."""
        log.info("SIGHUP: discard-list files are reloaded; other settings need a restart")
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.failure("a SIGHUP listener failed")

    def stopService(self) -> defer.Deferred[None] | None:
        if self._handler is not None and signal.getsignal(signal.SIGHUP) is self._handler:
            previous = self._previous
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
        self._handler = None
        return super().stopService()


class TLSContext(service.Service):
    """The STARTTLS server context: the configured PEM files, or a
    self-signed certificate generated into ``DATA/tls``.

    Loaded in ``privilegedStartService``: under ``twistd --uid`` that runs
    as root, so a key readable by root only still works. Until then
    ``getContext`` raises. The SMTP factory holds this object from
    construction on; Twisted's ``startTLS`` only calls ``getContext``."""

    name = "tls"

    def __init__(self, config: TLSConfig, data_dir: str, hostname: str) -> None:
        self.config = config
        self.data_dir = data_dir
        self.hostname = hostname
        self._options: Any = None

    def load(self) -> None:
        """Blocking: reads (or makes) the certificate. Raises OSError or
        ValueError with the file's name in it."""
        if self._options is None:
            self._options = tls.context_factory(self.config, self.data_dir, self.hostname)

    @property
    def loaded(self) -> bool:
        return self._options is not None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.load()

    def startService(self) -> None:
        super().startService()
        self.load()  # a no-op after privilegedStartService

    def getContext(self) -> Any:
        if self._options is None:
            raise RuntimeError("the TLS context is not loaded yet: the service has not started")
        return self._options.getContext()


class PTRLookup(service.Service):
    """Reverse DNS for SMTP sessions. Twisted's resolver reads
    /etc/resolv.conf and /etc/hosts and schedules re-reads when it is
    built, so it is built at start. Before that a lookup fails."""

    name = "rdns"

    def __init__(self, make: Callable[[], Callable[[str], defer.Deferred[str]]] | None = None):
        self._make = make if make is not None else rdns.make_lookup
        self._lookup: Callable[[str], defer.Deferred[str]] | None = None

    def startService(self) -> None:
        super().startService()
        if self._lookup is None:
            self._lookup = self._make()

    def __call__(self, ip: str) -> defer.Deferred[str]:
        if self._lookup is None:
            return defer.fail(RuntimeError("reverse DNS is not started"))
        return self._lookup(ip)
