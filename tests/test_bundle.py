from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import mailbox
import os
import random
import shutil
import subprocess
import threading
from typing import Any, cast

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.bundle import BundleSet
from spamtrap.config import RotateConfig, SetConfig
from spamtrap.mbox import MboxReader, entry, read_mbox
from spamtrap.metrics import Metrics
from spamtrap.store import KEY_RE, manifest_key
from spamtrap.store.local import LocalStore

T = calendar.timegm((2026, 11, 22, 13, 31, 15))
MESSAGES = [
    b"Subject: one\r\n\r\nFrom the start\r\n>From quoted\r\n",
    b"Subject: two \xe9\xff\r\n\r\nbare\nlf and \r cr\r\n",
    b"Subject: three\n\n>>From x\nFrom y\n",
]


class SyncPool:
    """Twisted's ThreadPool contract, run at once in the calling thread."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


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

    def put(self, key: str, path: str, manifest: bytes) -> defer.Deferred[None]:
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
        self.stored.append((key, data, doc))
        return defer.succeed(None)

    def url(self, key: str) -> str | None:
        return None

    def describe(self) -> str:
        return "recording"


class Harness:
    def __init__(
        self,
        tmp_path: Any,
        store: Any = None,
        shards: int = 1,
        seed: int = 1,
        **rotate: Any,
    ) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(T)
        self.pool = cast(Any, SyncPool())
        self.metrics = Metrics()
        self.work = str(tmp_path / "work")
        self.store = store if store is not None else RecordingStore()
        if isinstance(self.store, RecordingStore):
            self.store.clock = self.reactor
        self.acked: list[list[Any]] = []
        cfg = SetConfig(name="all", rotate=RotateConfig(**rotate), shards=shards)
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
        )

    def add(self, i: int, message: bytes | None = None, received: float | None = None) -> None:
        msg = message if message is not None else b"Subject: %d\r\n\r\nbody\r\n" % i
        at = received if received is not None else self.reactor.seconds()
        self.bundles.add(entry(f"s{i}@x", at, msg), at, i)

    def metric(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"set": "all"})

    def parts(self) -> list[str]:
        d = os.path.join(self.work, "all")
        return sorted(n for n in os.listdir(d) if n.endswith(".part")) if os.path.isdir(d) else []


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


def test_entries_to_local_store_round_trip(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = local_store(tmp_path)
    h = Harness(tmp_path, store=store)
    placed: list[str] = []
    real_replace = os.replace

    def recording_replace(a: str, b: str) -> None:
        placed.append(os.path.relpath(b, store.root))
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", recording_replace)
    h.bundles.start()
    for i, m in enumerate(MESSAGES):
        h.add(i, m, received=T + 10 - i)  # out of order on purpose
    assert h.metric("spamtrap_bundles_open") == 1
    assert placed == []
    h.bundles.rotate()

    assert h.acked == [[0, 1, 2]]
    assert len(placed) == 2
    key = placed[0]
    assert KEY_RE.fullmatch(key) and key.startswith("all/2026-11-22T13:31:15.node1.")
    assert placed[1] == manifest_key(key)  # the manifest comes last
    path = store.path_for(key)
    assert path is not None
    assert [m for _, m in read_mbox(path)] == MESSAGES
    with gzip.open(path, "rb") as gz:
        plain = gz.read()
    box_path = tmp_path / "box"
    box_path.write_bytes(plain)
    box = mailbox.mbox(str(box_path), create=False)
    try:
        assert [box.get_bytes(k) for k in box.keys()] == [
            entry("x", T, m).split(b"\n", 1)[1][:-1] for m in MESSAGES
        ]
    finally:
        box.close()
    if shutil.which("gzip"):
        subprocess.run(["gzip", "-t", path], check=True)

    mpath = store.path_for(manifest_key(key))
    assert mpath is not None
    with open(mpath, "rb") as mf:
        raw = mf.read()
    doc = json.loads(raw.decode("utf-8"))
    with open(path, "rb") as bf:
        data = bf.read()
    assert raw.endswith(b"}\n")
    assert list(doc) == [
        "format", "set", "key", "size", "sha256", "messages",
        "first_received", "last_received", "node",
    ]  # fmt: skip
    assert doc == {
        "format": 1,
        "set": "all",
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "messages": 3,
        "first_received": "2026-11-22T13:31:23Z",
        "last_received": "2026-11-22T13:31:25Z",
        "node": "node1",
    }
    assert store.list_manifests("all") == [doc]
    assert h.parts() == []
    assert h.metric("spamtrap_bundles_total") == 1
    assert h.metric("spamtrap_bundle_bytes_total") == len(data)
    assert h.metric("spamtrap_set_messages_total") == 3
    assert h.metric("spamtrap_bundles_open") == 0


def test_rotation_by_max_messages(tmp_path: Any) -> None:
    h = Harness(tmp_path, max_messages=3)
    for i in range(7):
        h.add(i)
    assert h.acked == [[0, 1, 2], [3, 4, 5]]
    assert [len(unpack(data)) for _, data, _ in h.store.stored] == [3, 3]
    assert h.parts() != []  # the seventh message waits in an open bundle
    h.bundles.rotate()
    assert h.acked == [[0, 1, 2], [3, 4, 5], [6]]
    assert [doc["messages"] for _, _, doc in h.store.stored] == [3, 3, 1]
    assert len({key for key, _, _ in h.store.stored}) == 3
    assert h.parts() == []


def test_rotation_by_max_bytes(tmp_path: Any) -> None:
    h = Harness(tmp_path, max_bytes=150_000)
    rnd = random.Random(7)
    blobs = [rnd.randbytes(100_000) + b"\n" for _ in range(5)]
    for i, blob in enumerate(blobs):
        h.add(i, blob)
    # Incompressible: each message adds ~100 kB, so two fill a bundle.
    assert h.acked == [[0, 1], [2, 3]]
    assert unpack(h.store.stored[0][1]) == blobs[:2]
    assert all(doc["size"] >= 150_000 for _, _, doc in h.store.stored)


def test_rotation_by_age_with_clock(tmp_path: Any) -> None:
    h = Harness(tmp_path, max_age=60)
    h.bundles.start()
    h.add(0)
    h.reactor.advance(30)
    h.add(1)
    h.reactor.advance(29)
    assert h.acked == []
    h.reactor.advance(1)
    assert h.acked == [[0, 1]]
    # The next bundle is named after the time it was opened.
    h.reactor.advance(5)
    h.add(2)
    h.reactor.advance(60)
    assert h.acked == [[0, 1], [2]]
    assert [k.split("/")[1][:19] for k, _, _ in h.store.stored] == [
        "2026-11-22T13:31:15",
        "2026-11-22T13:32:20",
    ]
    # Nothing open: the loop stores nothing more.
    h.reactor.advance(600)
    assert len(h.store.stored) == 2


def test_age_loop_survives_an_exception(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path, max_age=5)
    h.bundles.start()
    h.add(0)
    real = h.bundles._rotate_where
    calls = []

    def flaky(due: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(due)

    monkeypatch.setattr(h.bundles, "_rotate_where", flaky)
    h.reactor.advance(1)
    assert calls == [1]
    h.reactor.advance(5)
    assert h.acked == [[0]]


def test_shards_spread_messages_over_bundles_of_one_period(tmp_path: Any) -> None:
    h = Harness(tmp_path, shards=4, seed=42)
    for i in range(40):
        h.add(i)
    assert h.metric("spamtrap_bundles_open") == 4
    h.bundles.rotate()
    assert len(h.store.stored) == 4
    counts = [doc["messages"] for _, _, doc in h.store.stored]
    assert all(c > 0 for c in counts) and sum(counts) == 40
    assert sorted(t for tokens in h.acked for t in tokens) == list(range(40))
    stamps = {key.split("/")[1][:19] for key, _, _ in h.store.stored}
    assert stamps == {"2026-11-22T13:31:15"}
    assert len({key for key, _, _ in h.store.stored}) == 4


def test_start_removes_leftover_parts(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    d = os.path.join(h.work, "all")
    os.makedirs(d)
    for name in ("old.mbox.gz.part", "other.part", "keep.txt"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x")
    h.bundles.start()
    assert sorted(os.listdir(d)) == ["keep.txt"]


def test_store_failure_is_retried_with_backoff_and_acked_once(tmp_path: Any) -> None:
    store = RecordingStore(failures=2)
    h = Harness(tmp_path, store=store)
    h.add(0)
    h.add(1)
    h.bundles.rotate()
    assert len(store.attempts) == 1 and h.acked == []
    assert h.metric("spamtrap_store_errors_total") == 1
    assert len(h.parts()) == 1  # kept until stored
    h.reactor.advance(1.0)  # first retry within 1 s
    assert len(store.attempts) == 2 and h.acked == []
    assert h.metric("spamtrap_store_errors_total") == 2
    h.reactor.advance(2.0)  # second retry within 2 s
    assert len(store.attempts) == 3
    assert h.acked == [[0, 1]]
    assert {k for k, _ in store.attempts} == {store.stored[0][0]}
    assert h.parts() == []
    h.reactor.advance(1000)
    assert len(store.attempts) == 3 and h.acked == [[0, 1]]
    assert h.metric("spamtrap_bundles_total") == 1


def test_backoff_doubles_to_300_seconds_with_jitter(tmp_path: Any) -> None:
    store = RecordingStore(failures=11)
    h = Harness(tmp_path, store=store)
    h.add(0)
    h.bundles.rotate()
    while len(store.attempts) < 12:
        h.reactor.advance(0.25)
    gaps = [b[1] - a[1] for a, b in zip(store.attempts, store.attempts[1:], strict=False)]
    bases = [min(300.0, 2.0**k) for k in range(11)]
    for gap, base in zip(gaps, bases, strict=True):
        assert base / 2 <= gap <= base + 0.25
    assert h.acked == [[0]]


def test_stop_finalises_open_bundles(tmp_path: Any) -> None:
    h = Harness(tmp_path, shards=2)
    h.bundles.start()
    for i in range(6):
        h.add(i)
    d = h.bundles.stop()
    assert fired(d)
    assert sorted(t for tokens in h.acked for t in tokens) == list(range(6))
    assert h.parts() == []
    assert h.metric("spamtrap_bundles_open") == 0
    with pytest.raises(RuntimeError, match="after stop"):
        h.add(9)
    # The age loop is stopped too.
    assert not h.reactor.getDelayedCalls()


def test_stop_with_nothing_open_stores_nothing(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    h.bundles.start()
    h.bundles.rotate()
    assert fired(h.bundles.stop())
    assert h.store.attempts == []


def test_stop_waits_for_retries(tmp_path: Any) -> None:
    store = RecordingStore(failures=1)
    h = Harness(tmp_path, store=store)
    h.add(0)
    d = h.bundles.stop()
    assert not fired(d)
    h.reactor.advance(1.0)
    assert fired(d)
    assert h.acked == [[0]]


def test_cancelled_stop_abandons_retries(tmp_path: Any) -> None:
    store = RecordingStore(failures=100)
    h = Harness(tmp_path, store=store)
    h.add(0)
    d = h.bundles.stop()
    errors: list[Failure] = []
    d.addErrback(errors.append)
    d.cancel()
    assert errors and errors[0].check(defer.CancelledError)
    h.reactor.advance(1000)
    assert len(store.attempts) == 1 and h.acked == []
    assert len(h.parts()) == 1  # left for the next start; the spool still has it


def test_write_error_drops_bundle_without_acking(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    h.add(0)
    bundle = h.bundles._open[0]
    assert bundle is not None
    real = bundle.file

    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            real.close()

    bundle.file = Broken()  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space"):
        h.add(1, os.urandom(200_000) + b"\n")  # enough to force output
    assert h.parts() == [] and h.metric("spamtrap_bundles_open") == 0
    h.add(2)
    h.bundles.rotate()
    assert h.acked == [[2]]


def test_concurrent_adds_lose_nothing(tmp_path: Any) -> None:
    store = local_store(tmp_path)
    h = Harness(tmp_path, store=store, shards=3, max_messages=40)
    threads_n, per_thread = 8, 150

    def worker(t: int) -> None:
        for j in range(per_thread):
            i = t * per_thread + j
            h.add(i, b"Subject: %d\r\n\r\nFrom %d\r\n" % (i, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.reactor.drain()
    assert fired(h.bundles.stop())
    total = threads_n * per_thread
    assert sorted(tok for tokens in h.acked for tok in tokens) == list(range(total))
    got: list[bytes] = []
    for doc in store.list_manifests("all"):
        path = store.path_for(doc["key"])
        assert path is not None
        msgs = [m for _, m in read_mbox(path)]
        assert len(msgs) == doc["messages"]
        got.extend(msgs)
    assert sorted(got) == sorted(b"Subject: %d\r\n\r\nFrom %d\r\n" % (i, i) for i in range(total))
    assert h.metric("spamtrap_set_messages_total") == total


def test_seal_failure_drops_bundle_and_stop_still_finishes(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spamtrap import bundle as bundle_mod

    def failing_seal(self: Any) -> None:
        self.file.close()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(bundle_mod._Bundle, "seal", failing_seal)
    h = Harness(tmp_path)
    h.add(0)
    assert fired(h.bundles.stop())
    assert h.store.attempts == [] and h.acked == []
    assert h.parts() == []
