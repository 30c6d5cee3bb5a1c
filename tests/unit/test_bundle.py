from __future__ import annotations

import gzip
import hashlib
import json
import mailbox
import os
import random
import threading
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from spamtrap.bundle.manifest import Manifest, Published
from spamtrap.bundle.mbox import entry, read_mbox
from spamtrap.config import StoreConfig
from spamtrap.store import KEY_RE, index_key, manifest_key
from tests.support.bundles import (
    MESSAGES,
    ControlledStore,
    Harness,
    RecordingStore,
    T,
    bundle_of,
    fill_the_disk,
    fired,
    local_store,
    unpack,
)


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
    assert len(placed) == 3
    key = placed[0]
    assert KEY_RE.fullmatch(key) and key.startswith("all/2026-11-22T13:31:15.node1.")
    assert placed[1:] == [index_key(key), manifest_key(key)]  # the manifest comes last
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
        "first_received", "last_received", "node", "index", "index_sha256",
    ]  # fmt: skip
    ipath = store.path_for(index_key(key))
    assert ipath is not None
    with open(ipath, "rb") as inf:
        index_bytes = inf.read()
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
        "index": index_key(key).split("/")[1],
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
    }
    assert len(index_bytes.splitlines()) == 3
    assert [m.to_dict() for m in store.read_manifests("all")] == [doc]
    assert store.read_manifests("all")[0].to_json_bytes() == raw
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


def test_add_many_rotates_exactly_at_max_messages(tmp_path: Any) -> None:
    h = Harness(tmp_path, max_messages=3)
    messages = [(i, b"Subject: %d\r\n\r\nFrom here\r\n" % i) for i in range(8)]
    assert h.add_many(messages[:2]) == []
    assert h.add_many(messages[2:]) == []
    assert h.acked == [[0, 1, 2], [3, 4, 5]]
    h.bundles.rotate()
    assert h.acked == [[0, 1, 2], [3, 4, 5], [6, 7]]
    got = [m for _, data, _ in h.store.stored for m in unpack(data)]
    assert got == [m for _, m in messages]
    assert [doc["messages"] for _, _, doc in h.store.stored] == [3, 3, 2]
    assert h.metric("spamtrap_set_messages_total") == 8


def test_add_many_rotates_at_max_bytes_like_add(tmp_path: Any) -> None:
    h = Harness(tmp_path, max_bytes=150_000)
    rnd = random.Random(7)
    blobs = [rnd.randbytes(100_000) + b"\n" for _ in range(5)]
    assert h.add_many(list(enumerate(blobs))) == []
    # As with add(): each message adds ~100 kB, so two fill a bundle.
    assert h.acked == [[0, 1], [2, 3]]
    assert unpack(h.store.stored[1][1]) == blobs[2:4]


def test_add_many_write_error_returns_the_lost_tokens(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    h.add(0)
    fill_the_disk(h)
    lost = h.add_many([(1, os.urandom(200_000) + b"\n"), (2, b"x\n")])
    assert lost == [1, 2]  # one chunk: both were in the failed write
    assert h.parts() == [] and h.metric("spamtrap_bundles_open") == 0
    assert h.add_many([(3, b"y\n")]) == []
    h.bundles.rotate()
    assert h.acked == [[3]]  # 0 went down with its bundle: the spool replays it


class Disk:
    """Bundle files on a disk that can be full: then every write or flush
    that would put bytes on it fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from spamtrap.bundle import file as bundle_file

        self.full = False
        disk = self

        class File:
            def __init__(self, path: str, mode: str) -> None:
                self.real = open(path, mode)  # noqa: SIM115 - closed by close()

            def write(self, data: bytes) -> int:
                if disk.full:
                    raise OSError(28, "No space left on device")
                return self.real.write(data)

            def flush(self) -> None:
                if disk.full:
                    raise OSError(28, "No space left on device")
                self.real.flush()

            def fileno(self) -> int:
                return self.real.fileno()

            def close(self) -> None:
                self.real.close()

        monkeypatch.setattr(bundle_file, "open", File, raising=False)


def test_write_failure_is_reported_from_the_first_failure_until_bytes_reach_the_disk(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(monkeypatch)
    h = Harness(tmp_path)
    h.add(0)
    assert h.bundles.write_failure is None
    disk.full = True
    h.reactor.advance(5)
    assert h.add_many([(1, os.urandom(200_000) + b"\n")]) == [1]
    first = h.reactor.seconds()
    assert h.bundles.write_failure == ("No space left on device", first)

    # Still full later: a tiny message that deflate would hold back still
    # tests the disk (a buffered write alone proves nothing), and the
    # outage keeps its start.
    h.reactor.advance(30)
    with pytest.raises(OSError, match="No space"):
        h.add(2)
    assert h.bundles.write_failure == ("No space left on device", first)
    assert h.parts() == []

    # Space again: the next write reaches the disk and ends the outage,
    # and its bundle (pushed mid-stream) is still one valid gzip member.
    disk.full = False
    h.reactor.advance(10)
    h.add(3)
    assert h.bundles.write_failure is None
    h.add(4)
    h.bundles.rotate()
    assert h.acked == [[3, 4]]
    assert len(unpack(h.store.stored[0][1])) == 2


def test_a_seal_failure_is_reported_until_a_seal_succeeds(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spamtrap.bundle import sets as bundle_mod

    real_seal = bundle_mod._Bundle.seal

    def failing_seal(self: Any) -> None:
        self.file.close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_mod._Bundle, "seal", failing_seal)
    h = Harness(tmp_path)
    h.add(0)
    h.bundles.rotate()
    assert h.bundles.write_failure == ("No space left on device", T)
    assert h.acked == []

    monkeypatch.setattr(bundle_mod._Bundle, "seal", real_seal)
    h.reactor.advance(60)
    h.add(1)  # the push succeeds first: bytes reached the disk
    assert h.bundles.write_failure is None
    h.bundles.rotate()
    assert h.acked == [[1]] and h.bundles.write_failure is None


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
    fill_the_disk(h)
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
    for doc in store.read_manifests("all"):
        path = store.path_for(doc.key)
        assert path is not None
        msgs = [m for _, m in read_mbox(path)]
        assert len(msgs) == doc.messages
        got.extend(msgs)
    assert sorted(got) == sorted(b"Subject: %d\r\n\r\nFrom %d\r\n" % (i, i) for i in range(total))
    assert h.metric("spamtrap_set_messages_total") == total


def test_seal_failure_drops_bundle_and_stop_still_finishes(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spamtrap.bundle import sets as bundle_mod

    def failing_seal(self: Any) -> None:
        self.file.close()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(bundle_mod._Bundle, "seal", failing_seal)
    h = Harness(tmp_path)
    h.add(0)
    assert fired(h.bundles.stop())
    assert h.store.attempts == [] and h.acked == []
    assert h.parts() == []


# -- deadline skipping, outages, publishing -------------------------------------


def skipped(h: Harness, reason: str) -> float | None:
    return h.metrics.registry.get_sample_value(
        "spamtrap_bundles_skipped_total", {"set": "all", "reason": reason}
    )


def test_skip_policy_drops_a_bundle_that_finds_the_upload_busy(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store)
    bundle_of(h, 0, 1)
    bundle_of(h, 2)
    # The second bundle is dropped at once: acked (shed on purpose), deleted.
    assert len(store.calls) == 1
    assert h.acked == [[2]]
    assert skipped(h, "busy") == 1
    assert len(h.parts()) == 1  # only the bundle being stored
    assert h.metric("spamtrap_bundles_waiting") == 1
    store.succeed(0)
    assert h.acked == [[2], [0, 1]]
    assert h.parts() == [] and h.metric("spamtrap_bundles_waiting") == 0
    # Not busy any more: the next bundle is stored.
    bundle_of(h, 3)
    assert len(store.calls) == 2 and store.calls[1][1]["messages"] == 1
    store.succeed(1)
    assert h.acked == [[2], [0, 1], [3]]
    assert skipped(h, "busy") == 1
    assert h.metric("spamtrap_bundles_total") == 2


def test_queue_policy_keeps_a_bounded_fifo_and_sheds_the_oldest(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, set_options={"upload_policy": "queue", "upload_queue": 2})
    for token in range(4):
        bundle_of(h, token)
    # Bundle 0 uploads; 1, 2, 3 queue, and the queue holds 2: 1 is shed.
    assert len(store.calls) == 1
    assert h.acked == [[1]]
    assert skipped(h, "queue-full") == 1
    assert len(h.parts()) == 3
    assert h.metric("spamtrap_bundles_waiting") == 3
    store.succeed(0)
    assert len(store.calls) == 2  # the oldest waiting one starts
    store.succeed(1)
    store.succeed(2)
    assert [doc["key"] for _, doc, _ in store.calls] == store.keys()
    assert h.acked == [[1], [0], [2], [3]]  # first in, first out
    assert h.parts() == [] and skipped(h, "busy") is None


def test_a_set_uploads_one_bundle_per_shard_at_a_time(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, shards=3, seed=5)
    for i in range(30):
        h.add(i)
    h.bundles.rotate()
    # One rotation of three shards: three uploads at once, none skipped.
    assert len(store.calls) == 3 and skipped(h, "busy") is None
    bundle_of(h, 99)
    assert len(store.calls) == 3 and skipped(h, "busy") == 1
    for n in range(3):
        store.succeed(n)
    assert sorted(t for tokens in h.acked for t in tokens) == [*range(30), 99]


def test_outage_builds_a_backlog_that_uploads_by_itself_in_order(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, store_config=StoreConfig(retry_initial=2, retry_max=8))
    bundle_of(h, 0)
    store.fail(0)  # the store is down
    # While it is down, new bundles wait (skip policy or not): nothing is lost.
    bundle_of(h, 1)
    bundle_of(h, 2)
    assert skipped(h, "busy") is None and h.acked == []
    assert len(h.parts()) == 3
    h.reactor.advance(2)
    assert len(store.calls) == 2  # only the first bundle is retried
    store.fail(1)
    h.reactor.advance(4)
    assert store.keys()[2] == store.keys()[0]
    store.succeed(2)  # back
    assert h.acked == [[0]]
    store.succeed(3)
    store.succeed(4)
    assert h.acked == [[0], [1], [2]]
    assert len(set(store.keys())) == 3 and h.parts() == []
    # Caught up: busy means skip again.
    bundle_of(h, 3)
    bundle_of(h, 4)
    assert h.acked == [[0], [1], [2], [4]] and skipped(h, "busy") == 1


def test_outage_backlog_is_bounded_by_bytes_oldest_shed(tmp_path: Any) -> None:
    store = ControlledStore()
    rnd = random.Random(3)
    h = Harness(tmp_path, store=store, store_config=StoreConfig(backlog_bytes=25_000))
    bundle_of(h, 0)
    store.fail(0)
    for token in (1, 2, 3):
        h.add(token, rnd.randbytes(10_000) + b"\n")  # ~10 kB compressed each
        h.bundles.rotate()
    # Three 10 kB bundles do not fit in 25 kB: the oldest waiting one goes.
    assert h.acked == [[1]]
    assert skipped(h, "backlog-full") == 1
    h.reactor.advance(1)
    store.succeed(1)
    store.succeed(2)
    store.succeed(3)
    assert h.acked == [[1], [0], [2], [3]]


def test_retry_delays_come_from_the_store_config(tmp_path: Any) -> None:
    store = RecordingStore(failures=5)
    h = Harness(tmp_path, store=store, store_config=StoreConfig(retry_initial=10, retry_max=30))
    h.add(0)
    h.bundles.rotate()
    while len(store.attempts) < 6:
        h.reactor.advance(0.5)
    gaps = [b[1] - a[1] for a, b in zip(store.attempts, store.attempts[1:], strict=False)]
    for gap, base in zip(gaps, [10, 20, 30, 30, 30], strict=True):
        assert base / 2 <= gap <= base + 0.5
    assert h.acked == [[0]]


def test_on_published_gets_manifest_and_url_after_the_store(tmp_path: Any) -> None:
    store = ControlledStore()
    published: list[Published] = []
    h = Harness(tmp_path, store=store, on_published=published.append)
    bundle_of(h, 0, 1)
    bundle_of(h, 2)  # skipped: never announced
    assert published == []
    store.succeed(0)
    key, doc, _ = store.calls[0]
    assert published == [Published(Manifest.from_dict(doc), f"https://cdn.example/{key}")]
    assert doc["messages"] == 2 and doc["key"] == key


@pytest.mark.parametrize("how", ["raise", "deferred"])
def test_a_failing_on_published_never_breaks_the_set(tmp_path: Any, how: str) -> None:
    calls = []

    def broken(notice: Published) -> defer.Deferred[None]:
        calls.append(notice.manifest.key)
        if how == "raise":
            raise RuntimeError("relay is on fire")
        return defer.fail(RuntimeError("relay is on fire"))

    h = Harness(tmp_path, on_published=broken)
    bundle_of(h, 0)
    bundle_of(h, 1)
    assert h.acked == [[0], [1]] and len(calls) == 2
    assert h.parts() == [] and h.metric("spamtrap_bundles_total") == 2
    assert fired(h.bundles.stop())


def test_stop_never_skips_its_final_bundles(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store)
    h.bundles.start()
    bundle_of(h, 0)
    h.add(1)
    d = h.bundles.stop()
    assert len(store.calls) == 1 and skipped(h, "busy") is None
    store.succeed(0)
    assert not fired(d)
    store.succeed(1)  # the final bundle, stored after the one before it
    assert fired(d)
    assert h.acked == [[0], [1]]


def test_cancelled_stop_forgets_waiting_bundles_without_acking(tmp_path: Any) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, set_options={"upload_policy": "queue"})
    bundle_of(h, 0)
    store.fail(0)
    bundle_of(h, 1)
    d = h.bundles.stop()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    h.reactor.advance(1000)
    assert len(store.calls) == 1 and h.acked == []
    assert len(h.parts()) == 2  # left for the next start; the spool still has them
