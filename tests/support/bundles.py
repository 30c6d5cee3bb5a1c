"""Bundle-set test helpers: a Clock that also takes calls from threads, stores
that record or hold each put, and a Harness around one BundleSet."""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import os
import random
import threading
from typing import Any, cast

from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.bundle.mbox import MboxReader, entry
from spamtrap.bundle.sets import BundleSet
from spamtrap.config import RotateConfig, SetConfig, StoreConfig
from spamtrap.metrics import Metrics
from spamtrap.store.local import LocalStore
from tests.support.doubles import SyncPool

T = calendar.timegm((2026, 11, 22, 13, 31, 15))


MESSAGES = [
    b"Subject: one\r\n\r\nFrom the start\r\n>From quoted\r\n",
    b"Subject: two \xe9\xff\r\n\r\nbare\nlf and \r cr\r\n",
    b"Subject: three\n\n>>From x\nFrom y\n",
]


class FakeReactor(Clock):
    """A Clock whose callFromThread runs at once in the main thread and
    queues calls from other threads until drain()."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[Any] = []
        self._lock = threading.Lock()

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            f(*a, **kw)
        else:
            with self._lock:
                self.queued.append((f, a, kw))

    def drain(self) -> None:
        while True:
            with self._lock:
                if not self.queued:
                    return
                f, a, kw = self.queued.pop(0)
            f(*a, **kw)


class RecordingStore:
    """Records every put, checking the object is complete when handed over."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts: list[tuple[str, float]] = []
        self.stored: list[tuple[str, bytes, dict[str, Any]]] = []
        self.clock: Clock | None = None

    def put(
        self, key: str, path: str, manifest: bytes, index: str | None = None
    ) -> defer.Deferred[None]:
        self.attempts.append((key, self.clock.seconds() if self.clock else 0.0))
        if self.failures:
            self.failures -= 1
            return defer.fail(OSError("store is down"))
        with open(path, "rb") as f:
            data = f.read()
        doc = json.loads(manifest)
        # The object is sealed before its manifest exists.
        assert doc["sha256"] == hashlib.sha256(data).hexdigest()
        assert doc["size"] == len(data)
        assert manifest.endswith(b"\n")
        if index is not None:  # sealed with the bundle: its sha256 is in the manifest
            with open(index, "rb") as f:
                assert doc["index_sha256"] == hashlib.sha256(f.read()).hexdigest()
        self.stored.append((key, data, doc))
        return defer.succeed(None)

    def url(self, key: str) -> str | None:
        return None

    def describe(self) -> str:
        return "recording"


class UploadMetrics(Metrics):
    """Metrics with the upload metrics bundle.py looks for, added here
    while metrics.py does not have them yet."""

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(self, "bundles_skipped"):
            self.bundles_skipped = Counter(
                "spamtrap_bundles_skipped",
                "Finished bundles dropped without storing",
                ["set", "reason"],
                registry=self.registry,
            )
        if not hasattr(self, "bundles_waiting"):
            self.bundles_waiting = Gauge(
                "spamtrap_bundles_waiting",
                "Finished bundles not stored yet",
                ["set"],
                registry=self.registry,
            )


class Harness:
    def __init__(
        self,
        tmp_path: Any,
        store: Any = None,
        shards: int = 1,
        seed: int = 1,
        set_options: dict[str, Any] | None = None,
        store_config: StoreConfig | None = None,
        on_published: Any = None,
        **rotate: Any,
    ) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(T)
        self.pool = cast(Any, SyncPool())
        self.metrics = UploadMetrics()
        self.work = str(tmp_path / "work")
        self.store = store if store is not None else RecordingStore()
        if isinstance(self.store, RecordingStore):
            self.store.clock = self.reactor
        self.acked: list[list[Any]] = []
        cfg = SetConfig(
            name="all", rotate=RotateConfig(**rotate), shards=shards, **(set_options or {})
        )
        self.bundles = BundleSet(
            cfg,
            "node1",
            self.work,
            self.store,
            self.metrics,
            self.reactor,
            self.pool,
            self.acked.append,
            clock=self.reactor,
            rng=random.Random(seed),
            store_config=store_config,
            on_published=on_published,
        )

    def add(self, i: int, message: bytes | None = None, received: float | None = None) -> None:
        msg = message if message is not None else b"Subject: %d\r\n\r\nbody\r\n" % i
        at = received if received is not None else self.reactor.seconds()
        self.bundles.add(entry(f"s{i}@x", at, msg), at, i)

    def add_many(self, items: list[tuple[int, bytes]]) -> list[Any]:
        at = self.reactor.seconds()
        return self.bundles.add_many([(entry(f"s{i}@x", at, m), at, i) for i, m in items])

    def metric(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"set": "all"})

    def parts(self) -> list[str]:
        """The unfinished bundles (``.mbox.gz.part``) in the work directory;
        each has its index's ``.index.jsonl.part`` beside it, checked here."""
        d = os.path.join(self.work, "all")
        names = os.listdir(d) if os.path.isdir(d) else []
        bundles = sorted(n for n in names if n.endswith(".mbox.gz.part"))
        indexes = sorted(n for n in names if n.endswith(".index.jsonl.part"))
        assert [n.replace(".index.jsonl.", ".mbox.gz.") for n in indexes] == bundles
        return bundles


def local_store(tmp_path: Any) -> LocalStore:
    pool = cast(Any, SyncPool())
    return LocalStore(str(tmp_path / "bundles"), FakeReactor(), pool)


def fired(d: defer.Deferred[Any]) -> bool:
    out: list[Any] = []
    d.addBoth(out.append)
    if out and isinstance(out[0], Failure):
        out[0].raiseException()
    return bool(out)


def unpack(data: bytes) -> list[bytes]:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        return [m for _, m in MboxReader(f)]  # type: ignore[arg-type]


def fill_the_disk(h: Any) -> None:
    """Make the open bundle's file fail every write, as a full disk would."""
    bundle = h.bundles.writer.shards[0]
    assert bundle is not None
    real = bundle.file

    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            real.close()

    bundle.file = Broken()  # type: ignore[assignment]


class ControlledStore:
    """A store whose every put waits for the test to fire it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], defer.Deferred[None]]] = []

    def put(
        self, key: str, path: str, manifest: bytes, index: str | None = None
    ) -> defer.Deferred[None]:
        assert os.path.isfile(path)  # the .part file lives until stored
        d: defer.Deferred[None] = defer.Deferred()
        self.calls.append((key, json.loads(manifest), d))
        return d

    def url(self, key: str) -> str | None:
        return f"https://cdn.example/{key}"

    def describe(self) -> str:
        return "controlled"

    def keys(self) -> list[str]:
        return [key for key, _, _ in self.calls]

    def succeed(self, n: int) -> None:
        self.calls[n][2].callback(None)

    def fail(self, n: int) -> None:
        self.calls[n][2].errback(OSError("store is down"))


def bundle_of(h: Harness, *tokens: int) -> None:
    """Write one bundle holding ``tokens`` and rotate it."""
    for i in tokens:
        h.add(i)
    h.bundles.rotate()
