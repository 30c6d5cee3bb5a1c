"""What a node acquires when it starts, one ``IService`` per concern.

``makeService`` only builds plain objects: no directory is created, no
certificate made or read, no list file read, no signal handler installed
and no reactor trigger added until the service tree starts. The services
here are the children of :class:`spamtrap.service.compose.SpamtrapService` that do
those things; they start in the order they were added and stop in reverse.
"""

from __future__ import annotations

import importlib
import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from spamtrap.config import Config, TLSConfig
from spamtrap.filters import Stage
from spamtrap.filters.lists import ListsStage
from spamtrap.filters.registry import BUILTIN_MODULES
from spamtrap.intake import rdns, tls

log = Logger()


def build_stages(cfg: Config, reactor: Any) -> tuple[list[tuple[str, Stage]], ListsStage | None]:
    """The stages in ``filters.order``, as ``filters.registry.build_stages``
    builds them, except that the discard-list stage is built without reading
    its files: those are read by a :class:`ListsReloader` at start. Returns
    the stages and that stage (None when no lists are configured)."""
    custom = {c.name: c for c in cfg.filters.custom}
    stages: list[tuple[str, Stage]] = []
    lists_stage: ListsStage | None = None
    for name in cfg.filters.order:
        stage: Stage | None
        if name in custom:
            from spamtrap.filters.custom import load

            stage = load(custom[name])
        elif name == "lists":
            lists = cfg.filters.lists
            stage = lists_stage = (
                ListsStage(lists.rules, lists.files) if lists.rules or lists.files else None
            )
        elif name in BUILTIN_MODULES:
            stage = importlib.import_module(BUILTIN_MODULES[name]).make(cfg, reactor)
        else:
            continue
        if stage is not None:
            stages.append((name, stage))
    return stages, lists_stage


class ListsReloader(service.Service):
    """Reads the discard-list files at start, then reloads them every
    ``reload_interval`` and on SIGHUP; stops watching at stop."""

    name = "lists-reloader"

    def __init__(
        self,
        stage: ListsStage,
        interval: float,
        reactor: Any,
        *,
        clock: Any = None,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None,
    ) -> None:
        """``clock`` and ``run_in_thread`` replace the reactor's timers and
        thread pool for the periodic check (see ListsStage.watch)."""
        self.stage = stage
        self.interval = interval
        self.reactor = reactor
        self.clock = clock
        self.run_in_thread = run_in_thread

    def startService(self) -> None:
        super().startService()
        # Before intake (and, under twistd, before the reactor runs): a
        # blocking read of small files is harmless here.
        self.stage.reload()
        if self.stage.files:
            self.stage.watch(self.reactor, self.interval, self.clock, self.run_in_thread)

    def stopService(self) -> defer.Deferred[None] | None:
        self.stage.unwatch()
        return super().stopService()


class HupLogger(service.Service):
    """Says what SIGHUP does. Without a handler SIGHUP would kill the
    process (no drain, no clean stop); a ListsReloader started after this
    chains its reload in front of it."""

    name = "sighup"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._handler: Any = None
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        # Signal handlers can only be set from the main thread.
        if threading.current_thread() is not threading.main_thread():
            return

        def on_hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(
                log.info, "SIGHUP: discard-list files are reloaded; other settings need a restart"
            )

        self._previous = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, on_hup)
        self._handler = on_hup

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
