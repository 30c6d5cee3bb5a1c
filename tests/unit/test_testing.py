"""The public test doubles in spamtrap.testing behave as the real parts do."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from spamtrap.config import SetConfig
from spamtrap.errors import SourceStoppedError, WorkSourceError
from spamtrap.interfaces import Store, WorkSource
from spamtrap.store import Redirect, StoreClosedError, bundle_key, manifest_key
from spamtrap.testing import (
    ListEntry,
    ListWorkSource,
    MemoryStore,
    SyncPool,
    config,
    manifest_for,
)
from tests.support import doubles

T = 1795355475.0


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class InlineReactor:
    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def test_tests_doubles_reexports_the_public_ones() -> None:
    assert doubles.SyncPool is SyncPool
    assert doubles.MemoryStore is MemoryStore


# -- SyncPool ------------------------------------------------------------------------


def test_sync_pool_runs_at_once_and_hands_back_failures() -> None:
    pool = SyncPool()
    pool.start()
    ok = deferToThreadPool(InlineReactor(), pool, lambda a, b: a + b, 2, 3)  # type: ignore[arg-type]
    assert result_of(ok) == 5
    bad = deferToThreadPool(InlineReactor(), pool, lambda: 1 // 0)  # type: ignore[arg-type]
    with pytest.raises(ZeroDivisionError):
        result_of(bad)
    assert pool.calls == 2
    pool.stop()
    assert pool.joined and not pool.started
    with pytest.raises(RuntimeError, match="after stop"):
        pool.callInThread(lambda: None)


# -- MemoryStore ---------------------------------------------------------------------


def test_memory_store_is_a_store() -> None:
    assert isinstance(MemoryStore(), Store)


def put(store: MemoryStore, tmp_path: Path, when: float, doc: bytes | None = None) -> str:
    key = bundle_key("all", when, "node1")
    source = tmp_path / f"{when}.part"
    source.write_bytes(key.encode())
    result_of(store.put(key, str(source), doc or manifest_for(key).to_json_bytes()))
    return key


def test_memory_store_put_list_and_download(tmp_path: Path) -> None:
    store = MemoryStore(base_url="https://bucket.example/p/")
    keys = [put(store, tmp_path, T + dt) for dt in (0, 7200, 3600)]
    put(store, tmp_path, T + 9999, b"{not json")  # skipped, as the real stores do
    put(store, tmp_path, T + 9998, b'{"key": "all/x"}')  # not a manifest: skipped too
    assert store.puts[:3] == keys
    assert store.objects[keys[0]] == keys[0].encode()
    listed = result_of(store.list_manifests("all"))
    assert listed == [manifest_for(keys[i]) for i in (1, 2, 0)]
    assert result_of(store.list_manifests("none")) == []
    with pytest.raises(ValueError, match="invalid set name"):
        result_of(store.list_manifests("../all"))
    assert store.url(keys[0]) == f"https://bucket.example/p/{keys[0]}"
    assert store.open_download(keys[0]) == Redirect(f"https://bucket.example/p/{keys[0]}")
    assert store.open_download(manifest_key(keys[0])) is not None
    assert store.open_download(bundle_key("all", T + 1, "node1")) is None  # not stored
    assert MemoryStore().open_download(keys[0]) is None  # no URL: nothing to redirect to
    with pytest.raises(ValueError, match="not a bundle key"):
        result_of(store.put("all/x.json", str(tmp_path / f"{T}.part"), b"{}"))


def test_memory_store_holds_and_fails_listings(tmp_path: Path) -> None:
    store = MemoryStore()
    store.hold_listings()
    held = store.list_manifests("all")
    assert not held.called
    key = put(store, tmp_path, T)
    store.release_listings()
    assert [m.key for m in result_of(held)] == [key]  # the store as it is at release
    store.listing_error = OSError("disk on fire")
    with pytest.raises(OSError, match="disk on fire"):
        result_of(store.list_manifests("all"))
    assert store.listed == ["all", "all"]


def test_memory_store_close_fails_held_and_later_work(tmp_path: Path) -> None:
    store = MemoryStore()
    store.hold_listings()
    held = store.list_manifests("all")
    result_of(store.close())
    with pytest.raises(StoreClosedError):
        result_of(held)
    with pytest.raises(StoreClosedError):
        put(store, tmp_path, T)
    with pytest.raises(StoreClosedError):
        result_of(store.list_manifests("all"))


# -- ListWorkSource -----------------------------------------------------------------


def test_list_work_source_is_a_work_source() -> None:
    assert isinstance(ListWorkSource(), WorkSource)


def test_list_work_source_hands_out_in_order_and_forgets_acked() -> None:
    source = ListWorkSource([b"a", b"b", b"c"], unreadable={1})
    assert source.depth == 3
    first = result_of(source.get())
    assert first == ListEntry(0) and first.key == (0, 0)
    batch = source.take(5)
    assert [e.key for e in batch] == [(0, 1), (0, 2)]
    assert source.depth == 0 and source.take(5) == []
    got = source.read_entries([first, *batch])
    assert got[0] == b"a" and got[2] == b"c"
    assert isinstance(got[1], WorkSourceError)
    assert source.in_flight == [(0, 0), (0, 1), (0, 2)]
    source.ack_keys([(0, 1), (0, 0)])
    assert source.acked == [(0, 1), (0, 0)]
    assert source.in_flight == [(0, 2)]


def test_list_work_source_get_waits_and_can_be_cancelled() -> None:
    source = ListWorkSource()
    waiting = source.get()
    cancelled = source.get()
    assert not waiting.called
    cancelled.cancel()
    with pytest.raises(CancelledError):
        result_of(cancelled)
    entry = source.add(b"late")
    assert result_of(waiting) == entry  # the cancelled get took nothing
    assert source.depth == 0


def test_list_work_source_stop_fails_every_get() -> None:
    source = ListWorkSource()
    waiting = source.get()
    source.stop()
    with pytest.raises(SourceStoppedError):
        result_of(waiting)
    with pytest.raises(SourceStoppedError):
        result_of(source.get())


def test_config_changes_nested_keys_of_a_frozen_config() -> None:
    base = config(traps__catch_all=True, sets=[SetConfig("all")])
    cfg = config(base, smtp__timeouts__data=5.0, smtp__rdns=True, node="n1")
    assert (cfg.smtp.timeouts.data, cfg.smtp.rdns, cfg.node) == (5.0, True, "n1")
    assert cfg.traps.catch_all and [s.name for s in cfg.sets] == ["all"]
    # The base is untouched, and so is every section not named.
    assert base.smtp.timeouts.data == 600.0 and not base.smtp.rdns
    assert cfg.smtp.timeouts.command == base.smtp.timeouts.command
    assert cfg.filters is base.filters
    # Any section, not only a whole Config.
    assert config(SetConfig("x"), rotate__max_messages=5).rotate.max_messages == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.smtp.rdns = False  # type: ignore[misc]


def test_config_refuses_unknown_names() -> None:
    with pytest.raises(TypeError, match="Config has no field 'smtpp'"):
        config(smtpp__rdns=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rdnss'"):
        config(smtp__rdnss=True)
    with pytest.raises(TypeError, match="not a config section"):
        config(object())
