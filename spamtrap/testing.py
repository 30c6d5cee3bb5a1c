"""Public test doubles for spamtrap's seams, the way treq ships ``StubTreq``.

Each double provides its interface in ``spamtrap.interfaces`` (mypy checks
that below) and keeps its state in memory, so a test of a component that
uses a store, a work source or a thread pool runs without disk, sockets or
threads, and can look at what was done:

``SyncPool``
    Twisted's ``ThreadPool`` as ``deferToThreadPool`` uses it, running each
    call at once in the calling thread (like buildbot's ``NonThreadPool``).
``MemoryStore``
    A ``Store`` holding objects in a dict. Downloads redirect to
    ``base_url`` (as an S3 store's do) when it is given; listings can be
    held back and made to fail.
``ListWorkSource``
    A ``WorkSource`` over a list of records, for the pipeline.
``manifest_for``
    A valid ``Manifest`` for a bundle key and its bytes.
``config``
    A frozen ``Config`` with some keys changed, nested keys joined by
    ``__``: ``config(traps__catch_all=True, smtp__rdns=True)``; pass a
    config first to change that one instead of the defaults.

Put the web layer on a ``MemoryStore`` and drive its resource tree
(``spamtrap.web.make_root``) with ``treq.testing.StubTreq``::

    store = MemoryStore(base_url="https://bucket.example")
    stub = StubTreq(make_root(store, config, Metrics(), health))
    response = await stub.get("http://node/bundles/all/")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from spamtrap.bundle.manifest import Manifest
from spamtrap.config import Config
from spamtrap.errors import SourceStoppedError, WorkSourceError
from spamtrap.interfaces import EntryKey
from spamtrap.store import (
    BUNDLE_SUFFIX,
    KEY_RE,
    MANIFEST_SUFFIX,
    Download,
    Redirect,
    StoreClosedError,
    index_key,
    manifest_key,
    valid_set_name,
)

__all__ = ["ListEntry", "ListWorkSource", "MemoryStore", "SyncPool", "config", "manifest_for"]


# -- the pool ------------------------------------------------------------------


class SyncPool:
    """Twisted's ThreadPool contract (what ``deferToThreadPool`` and the
    stores use), each call run at once in the calling thread, so a Deferred
    from ``deferToThreadPool`` has fired when it is returned."""

    def __init__(self) -> None:
        self.started = False
        self.joined = False
        self.calls = 0  # how many calls ran

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False
        self.joined = True

    def callInThread(self, f: Callable[..., object], *a: Any, **kw: Any) -> None:  # noqa: N802
        self.callInThreadWithCallback(None, f, *a, **kw)

    def callInThreadWithCallback(  # noqa: N802 - ThreadPool's name
        self,
        on_result: Callable[[bool, object], object] | None,
        f: Callable[..., object],
        *a: Any,
        **kw: Any,
    ) -> None:
        if self.joined:
            # What a stopped ThreadPool does: it takes no more work.
            raise RuntimeError("SyncPool: call after stop()")
        self.calls += 1
        try:
            result = f(*a, **kw)
        except BaseException:  # noqa: BLE001 - handed to on_result, as ThreadPool does
            if on_result is not None:
                on_result(False, Failure())
        else:
            if on_result is not None:
                on_result(True, result)


# -- the store -------------------------------------------------------------------


class MemoryStore:
    """A ``Store`` in a dict, from key to bytes.

    ``put`` reads the file (and its index) at once (the caller keeps
    them), then records the manifest, as real stores commit it last. ``url(key)`` is
    ``base_url/key`` when ``base_url`` is given (public by key, as S3 is),
    and ``open_download`` redirects there for a stored key.

    For tests of callers: ``hold_listings()`` keeps ``list_manifests``
    unanswered until ``release_listings()``; ``listing_error`` makes it
    fail; ``listed`` records every set listed and ``puts`` every key put."""

    served_by_web = False

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.listed: list[str] = []
        self.listing_error: Exception | None = None
        self.closed = False
        self._held: list[tuple[str, Deferred[list[Manifest]]]] | None = None

    def add(self, key: str, data: bytes, manifest: Manifest | dict[str, Any] | bytes) -> None:
        """Store ``data`` under bundle ``key`` and its manifest at once (a
        dict or raw bytes may be anything, to test damaged manifests)."""
        _check_bundle_key(key)
        if isinstance(manifest, Manifest):
            raw = manifest.to_json_bytes()
        elif isinstance(manifest, bytes):
            raw = manifest
        else:
            raw = json.dumps(manifest).encode()
        self.objects[key] = data
        self.objects[manifest_key(key)] = raw

    # Store

    def describe(self) -> str:
        return f"memory store ({len(self.objects)} objects)"

    def url(self, key: str) -> str | None:
        return f"{self.base_url}/{key}" if self.base_url else None

    def put(self, key: str, path: str, manifest: bytes, index: str | None = None) -> Deferred[None]:
        if self.closed:
            return fail(StoreClosedError("memory store is closed"))
        try:
            _check_bundle_key(key)
            with open(path, "rb") as f:
                data = f.read()
            if index is not None:
                with open(index, "rb") as f:
                    self.objects[index_key(key)] = f.read()
        except (OSError, ValueError) as e:
            return fail(e)
        self.puts.append(key)
        self.add(key, data, manifest)
        return succeed(None)

    def list_manifests(self, set_name: str) -> Deferred[list[Manifest]]:
        if self.closed:
            return fail(StoreClosedError("memory store is closed"))
        if not valid_set_name(set_name):
            return fail(ValueError(f"invalid set name {set_name!r}"))
        self.listed.append(set_name)
        if self._held is not None:
            d: Deferred[list[Manifest]] = Deferred()
            self._held.append((set_name, d))
            return d
        return self._answer(set_name)

    def open_download(self, key: str) -> Download:
        url = self.url(key)
        if url is None or KEY_RE.fullmatch(key) is None or key not in self.objects:
            return None
        return Redirect(url)

    def close(self) -> Deferred[None]:
        self.closed = True
        held, self._held = self._held or [], None
        for _, d in held:
            d.errback(StoreClosedError("memory store is closed"))
        return succeed(None)

    # Holding listings back

    def hold_listings(self) -> None:
        if self._held is None:
            self._held = []

    def release_listings(self) -> None:
        """Answer every held listing, with the store as it is now."""
        held, self._held = self._held or [], None
        for set_name, d in held:
            self._answer(set_name).chainDeferred(d)

    def _answer(self, set_name: str) -> Deferred[list[Manifest]]:
        if self.listing_error is not None:
            return fail(self.listing_error)
        prefix = f"{set_name}/"
        keys = sorted(
            (k for k in self.objects if k.startswith(prefix) and k.endswith(MANIFEST_SUFFIX)),
            reverse=True,
        )
        docs = []
        for key in keys:
            try:
                docs.append(Manifest.from_json(self.objects[key], f"manifest {key}"))
            except ValueError:  # ManifestError too
                continue  # as the real stores: one damaged manifest is skipped
        return succeed(docs)


def manifest_for(
    key: str,
    data: bytes = b"",
    *,
    messages: int = 1,
    first_received: str = "2026-01-02T03:00:00Z",
    last_received: str = "2026-01-02T03:00:45Z",
) -> Manifest:
    """A valid manifest for bundle ``key`` (``<set>/<time>.<node>.<id>.mbox.gz``)
    whose ``.mbox.gz`` is ``data``: set and node come from the key."""
    match = KEY_RE.fullmatch(key)
    if match is None:
        raise ValueError(f"not a bundle key: {key!r}")
    return Manifest(
        set=match.group("set"),
        key=key,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        messages=messages,
        first_received=first_received,
        last_received=last_received,
        node=match.group("node"),
    )


def _check_bundle_key(key: str) -> None:
    if KEY_RE.fullmatch(key) is None or not key.endswith(BUNDLE_SUFFIX):
        raise ValueError(f"not a bundle key: {key!r}")


# -- the work source ---------------------------------------------------------------


@dataclass(frozen=True)
class ListEntry:
    """A record of a ``ListWorkSource``: its key is ``(0, index)``."""

    index: int

    @property
    def key(self) -> EntryKey:
        return (0, self.index)


@dataclass
class ListWorkSource:
    """A ``WorkSource`` over records in memory, handed out in order.

    ``add`` appends a record (and wakes a waiting ``get``); ``unreadable``
    holds indexes whose ``read_entries`` answer is a ``WorkSourceError``;
    ``acked`` lists the acknowledged keys in order; ``stop`` fails the
    waiting ``get`` calls and every later one with ``SourceStoppedError``."""

    records: list[bytes] = field(default_factory=list)
    unreadable: set[int] = field(default_factory=set)
    acked: list[EntryKey] = field(default_factory=list)
    stopped: bool = False
    _next: int = 0
    _handed_out: set[int] = field(default_factory=set)
    _waiters: deque[Deferred[ListEntry]] = field(default_factory=deque)

    def add(self, record: bytes) -> ListEntry:
        self.records.append(record)
        entry = ListEntry(len(self.records) - 1)
        while self._waiters and self._next < len(self.records):
            self._waiters.popleft().callback(self._hand_out())
        return entry

    def stop(self) -> None:
        self.stopped = True
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(SourceStoppedError("list work source stopped"))

    @property
    def in_flight(self) -> list[EntryKey]:
        """Handed out and not acked yet."""
        return [(0, i) for i in sorted(self._handed_out)]

    # WorkSource

    @property
    def depth(self) -> int:
        return len(self.records) - self._next

    def get(self) -> Deferred[ListEntry]:
        if self.stopped:
            return fail(SourceStoppedError("list work source stopped"))
        if self._next < len(self.records):
            return succeed(self._hand_out())

        def withdraw(d: Deferred[ListEntry]) -> None:
            self._waiters.remove(d)

        d: Deferred[ListEntry] = Deferred(canceller=withdraw)
        self._waiters.append(d)
        return d

    def take(self, limit: int) -> list[ListEntry]:
        out: list[ListEntry] = []
        while self._next < len(self.records) and len(out) < limit:
            out.append(self._hand_out())
        return out

    def read_entries(self, entries: Sequence[ListEntry]) -> Sequence[bytes | WorkSourceError]:
        out: list[bytes | WorkSourceError] = []
        for e in entries:
            if e.index in self.unreadable:
                out.append(WorkSourceError(f"record {e.index} is unreadable"))
            else:
                out.append(self.records[e.index])
        return out

    def ack_keys(self, keys: Iterable[EntryKey]) -> None:
        for key in keys:
            self._handed_out.discard(key[1])
            self.acked.append(key)

    def _hand_out(self) -> ListEntry:
        entry = ListEntry(self._next)
        self._next += 1
        self._handed_out.add(entry.index)
        return entry


# -- configs -------------------------------------------------------------------

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    _D = TypeVar("_D", bound=DataclassInstance)


@overload
def config(base: None = None, /, **changes: object) -> Config: ...


@overload
def config(base: _D, /, **changes: object) -> _D: ...


def config(base: object = None, /, **changes: object) -> object:
    """``base`` (else ``Config()``) with ``changes``, a frozen config's way
    of being set up: a key names a field, ``__`` joins the names of nested
    ones. ``config(cfg, smtp__timeouts__data=5.0, sets=[SetConfig("all")])``
    is ``cfg`` with those two changed; ``config(set_config, token="t")``
    changes any section the same way. An unknown name is an error. Values
    are taken as they are, unchecked: to check YAML as a file would be,
    use ``spamtrap.config.parse_config``."""
    section = Config() if base is None else base
    if not dataclasses.is_dataclass(section) or isinstance(section, type):
        raise TypeError(f"not a config section: {section!r}")
    return _replaced(section, changes)


def _replaced(obj: _D, changes: dict[str, object]) -> _D:
    direct: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {}
    for key, value in changes.items():
        name, joined, rest = key.partition("__")
        if joined:
            nested.setdefault(name, {})[rest] = value
        else:
            direct[name] = value
    for name, inner in nested.items():
        if name not in {f.name for f in dataclasses.fields(obj)}:
            raise TypeError(f"{type(obj).__name__} has no field {name!r}")
        section = cast("DataclassInstance", direct.get(name, getattr(obj, name)))
        direct[name] = _replaced(section, inner)
    return dataclasses.replace(obj, **direct)


if TYPE_CHECKING:
    from spamtrap.interfaces import Store, WorkSource

    def _doubles_conform(store: MemoryStore, source: ListWorkSource, pool: SyncPool) -> None:
        """Never called: mypy checks that each double provides its interface."""
        as_store: Store = store
        as_source: WorkSource[ListEntry] = source
        # ThreadPool is a class, not a Protocol: a SyncPool stands in for it
        # by the methods deferToThreadPool and the stores call.
        as_pool: Callable[..., None] = pool.callInThreadWithCallback
        del as_store, as_source, as_pool
