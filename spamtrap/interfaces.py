"""The seams between spamtrap's components, as ``typing.Protocol`` classes.

A message goes SMTP -> an ``Intake`` -> a ``WorkSource`` -> the pipeline ->
bundle writers -> a ``Store``; the bundle code calls a ``BundleSink`` back
once a bundle is stored, and the notifier sends through ``NoticeChannel``s.
Each seam below names what the caller relies on and nothing more, so a new
store, work source or notice channel is one class that provides it.

Implementations (checked by mypy in ``_implementations_conform`` below):

============== ==============================================================
WorkSource     ``spool.Spool`` (entries: ``SpoolEntry``), ``queue.QueueSource``
               (entries: ``StreamEntry``)
Intake         ``spool.SpoolIntake``, ``queue.QueueIntake``
BundleSink     ``pipeline.Pipeline``
Store          ``store.local.LocalStore``, ``store.s3.S3Store``
NoticeChannel  ``notify.mail.MailSender`` (to an address),
               ``notify.webhook.WebhookSender`` (to a ``WebhookConfig``)
============== ==============================================================

The reactor parts
    Each component is typed with the parts of the reactor it uses, the way
    treq's ``_types.py`` combines ``IReactorTCP``, ``IReactorTime`` and a
    resolver into the one reactor it needs. Twisted's own parts are zope
    interfaces, which mypy cannot match against a reactor or a
    ``task.Clock`` without the mypy-zope plugin; the Protocols here state
    the same methods structurally, so a reactor, a ``Clock`` and a test's
    stand-in all type-check. Where a Twisted API wants its zope interface
    (``LoopingCall.clock``, ``deferLater``, ``deferToThreadPool``),
    ``as_reactor_time`` and ``as_reactor_from_threads`` hand the same
    object over under that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, cast, runtime_checkable

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import (
        IConnector,
        IReactorFromThreads,
        IReactorTime,
    )
    from twisted.internet.protocol import ClientFactory

    from spamtrap.bundle.manifest import Manifest
    from spamtrap.config import WebhookConfig
    from spamtrap.errors import WorkSourceError
    from spamtrap.message import Envelope
    from spamtrap.store import Download

# A work entry's key: (segment, offset) in the spool, (ms, seq) of a stream id.
EntryKey = tuple[int, int]

# -- the reactor parts ---------------------------------------------------------


@runtime_checkable
class DelayedCall(Protocol):
    """``IDelayedCall``: what ``callLater`` returns."""

    def getTime(self) -> float: ...

    def cancel(self) -> None: ...

    def delay(self, seconds_later: float, /) -> None: ...

    def reset(self, seconds_from_now: float, /) -> None: ...

    def active(self) -> bool: ...


@runtime_checkable
class ReactorTime(Protocol):
    """The part of ``IReactorTime`` spamtrap uses: a reactor or a
    ``task.Clock`` (tests)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall: ...


@runtime_checkable
class ReactorFromThreads(Protocol):
    """``IReactorFromThreads``: how a pool thread hands a result back."""

    def callFromThread(
        self, callable: Callable[..., object], *args: object, **kw: object
    ) -> None: ...


@runtime_checkable
class ReactorTCP(Protocol):
    """The part of ``IReactorTCP`` the relay client uses."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,  # noqa: N803 - IReactorTCP names it
    ) -> IConnector: ...


@runtime_checkable
class WorkerReactor(ReactorTime, ReactorFromThreads, Protocol):
    """What a component with its own thread pool needs: timers, and the way
    back from its threads (the spool, the queue, the pipeline, the stores)."""


@runtime_checkable
class NetworkReactor(ReactorTime, ReactorFromThreads, ReactorTCP, Protocol):
    """What a component that talks to the network needs (the S3 store, the
    notifier's relay client and webhooks): timers, TCP, and the way back
    from its pool. Like treq's ``_ITreqReactor``, an approximation: the HTTP
    agent also resolves names through the reactor."""


def pick_clock(clock: ReactorTime | None, reactor: object) -> ReactorTime:
    """``clock`` if given, else ``reactor`` if it keeps time; a TypeError
    naming what is missing otherwise."""
    if clock is not None:
        return clock
    if isinstance(reactor, ReactorTime):
        return reactor
    raise TypeError(f"{reactor!r} has no seconds() and callLater(): pass a clock")


def as_reactor_time(clock: ReactorTime) -> IReactorTime:
    """``clock`` under the zope interface Twisted's APIs are annotated with
    (``LoopingCall.clock``, ``deferLater``); the same object."""
    return cast("IReactorTime", clock)


def as_reactor_from_threads(reactor: ReactorFromThreads) -> IReactorFromThreads:
    """``reactor`` as ``deferToThreadPool`` and ``blockingCallFromThread``
    want it; the same object."""
    return cast("IReactorFromThreads", reactor)


# -- the work source -------------------------------------------------------------


@runtime_checkable
class WorkEntry(Protocol):
    """A message handed out by a work source; its payload stays with the
    source until ``read_entries``."""

    @property
    def key(self) -> EntryKey: ...


EntryT = TypeVar("EntryT", bound=WorkEntry)


@runtime_checkable
class WorkSource(Protocol[EntryT]):
    """Where the pipeline takes messages from: the local spool, or the Redis
    stream. Every method runs in the reactor thread, except
    ``read_entries``, which blocks and runs in a worker thread.

    ``get()`` fails with ``errors.SourceStoppedError`` (a
    ``WorkSourceError``) once the source stopped. A message stays with the
    source until its key is acked: then it is gone for good (stored,
    discarded or unrouted)."""

    @property
    def depth(self) -> int:
        """Entries ready to hand out now."""
        ...

    def get(self) -> Deferred[EntryT]:
        """The next entry; waits while there is none. Cancellable."""
        ...

    def take(self, limit: int) -> list[EntryT]:
        """Up to ``limit`` ready entries, without waiting."""
        ...

    def read_entries(self, entries: Sequence[EntryT]) -> Sequence[bytes | WorkSourceError]:
        """(Blocking, any thread.) The records of handed-out entries, in
        order; a ``WorkSourceError`` in place of each unreadable one."""
        ...

    def ack_keys(self, keys: Iterable[EntryKey]) -> None:
        """Done with these entries: the source forgets them."""
        ...


# -- the intake -----------------------------------------------------------------------


@runtime_checkable
class Intake(Protocol):
    """Where the SMTP server puts a message at the end of DATA. The 250 waits
    for the Deferred: it fires (its value is not used) once the message is
    durable, and fails with ``errors.IntakeUnavailableError`` for a
    temporary refusal (451 "queue unavailable") or any other error (451
    "queue file write error")."""

    def submit(self, env: Envelope, /) -> Deferred[object]: ...


# -- the bundle sink ----------------------------------------------------------------

TokenT_contra = TypeVar("TokenT_contra", contravariant=True)


@runtime_checkable
class BundleSink(Protocol[TokenT_contra]):
    """Who is told, in the reactor thread, that the bundle holding these
    messages is stored: the tokens are what the sink handed the bundle
    writer with each message (``BundleSet.add_many``)."""

    def stored(self, tokens: Sequence[TokenT_contra], /) -> None: ...


# -- the store --------------------------------------------------------------------------


@runtime_checkable
class Store(Protocol):
    """Where finished bundles go (``spamtrap.store`` has the key scheme).

    A store gets its own thread pool at construction and runs all of its
    blocking work there (file writes and fsyncs, listings, signing), never
    in the caller's pool; ``close`` stops that pool. Every method is called
    in the reactor thread."""

    @property
    def served_by_web(self) -> bool:
        """Whether this node's web server serves the store's files itself
        (``open_download`` answers ``LocalFile``) rather than redirecting."""
        ...

    def put(self, key: str, path: str, manifest: bytes, index: str | None = None) -> Deferred[None]:
        """Store the file at ``path`` under ``key``, then the bundle's index
        (the file at ``index``, if given) under ``index_key(key)``, then the
        manifest (the commit marker) under ``manifest_key(key)``. The caller
        keeps its files."""
        ...

    def url(self, key: str) -> str | None:
        """The public URL of a stored key, if the store has one."""
        ...

    def describe(self) -> str:
        """A short human description for logs."""
        ...

    def list_manifests(self, set_name: str) -> Deferred[list[Manifest]]:
        """The checked manifests of a set, newest first; damaged or invalid
        ones are skipped. ValueError for an invalid set name."""
        ...

    def open_download(self, key: str) -> Download:
        """What to answer a download of ``key`` (a bundle or a manifest,
        taken literally: no percent-decoding): a ``LocalFile`` to stream,
        a ``Redirect``, or None if there is no such stored key. Cheap (at
        most a few stat calls), so it runs in the reactor thread."""
        ...

    def close(self) -> Deferred[None]:
        """At service stop: cancel what is in flight, close connections and
        stop the store's pool. The store is unusable afterwards."""
        ...


# -- notice channels ------------------------------------------------------------------

DestT_contra = TypeVar("DestT_contra", contravariant=True)


@runtime_checkable
class NoticeChannel(Protocol[DestT_contra]):
    """Sends one notice to one destination (an address, a webhook). The
    Deferred fails for an attempt the notifier should retry; the channel
    itself does not retry."""

    def send(self, destination: DestT_contra, body: bytes, /) -> Deferred[None]: ...


if TYPE_CHECKING:
    from twisted.internet.task import Clock

    from spamtrap.notify.mail import MailSender
    from spamtrap.notify.webhook import WebhookSender
    from spamtrap.store.local import LocalStore
    from spamtrap.store.s3 import S3Store
    from spamtrap.work.pipeline import Pipeline, Token
    from spamtrap.work.queue import QueueIntake
    from spamtrap.work.queue_source import QueueSource, StreamEntry
    from spamtrap.work.spool import Spool, SpoolEntry, SpoolIntake

    def _implementations_conform(
        spool: Spool,
        source: QueueSource,
        spool_intake: SpoolIntake,
        queue_intake: QueueIntake,
        pipeline: Pipeline,
        local: LocalStore,
        s3: S3Store,
        mail: MailSender,
        webhook: WebhookSender,
    ) -> None:
        """Never called: mypy checks that each implementation provides its
        interface, signatures included."""
        spool_work: WorkSource[SpoolEntry] = spool
        queue_work: WorkSource[StreamEntry] = source
        intakes: list[Intake] = [spool_intake, queue_intake]
        sink: BundleSink[Token] = pipeline
        stores: list[Store] = [local, s3]
        to_address: NoticeChannel[str] = mail
        to_webhook: NoticeChannel[WebhookConfig] = webhook
        clock: ReactorTime = Clock()  # the tests' clock, and every reactor
        del spool_work, queue_work, intakes, sink, stores, to_address, to_webhook, clock
