"""Local store retention: oldest first, manifest first, counted, and the
disk-use bound held before and after every put (task.Clock, a tmp dir)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamtrap.config import RetentionConfig, StoreConfig
from spamtrap.metrics import Metrics
from spamtrap.store import StoreConfigError, bundle_key, index_key, manifest_key, open_store
from spamtrap.store.local import LocalStore
from spamtrap.store.retention import SWEEP_INTERVAL, RetentionError, scan
from spamtrap.testing import SyncPool
from tests.support.bundles import FakeReactor as Clock

T = 1795440675.0
HOUR = 3600.0


def store(
    tmp_path: Path, clock: Clock, metrics: Metrics | None = None, **limits: Any
) -> LocalStore:
    return LocalStore(
        str(tmp_path / "bundles"),
        cast(Any, clock),
        cast(Any, SyncPool()),
        RetentionConfig(**limits),
        metrics,
        clock,
    )


def put(s: LocalStore, tmp_path: Path, when: float, size: int, set_name: str = "all") -> str:
    key = bundle_key(set_name, when, "node1")
    part, index = tmp_path / "part", tmp_path / "index"
    part.write_bytes(b"b" * size)
    index.write_bytes(b"i" * 10)
    s.put(key, str(part), b"m" * 5, str(index))
    # The store hard-links the files: new ones for the next put, as the
    # uploader removes its own after each.
    part.unlink()
    index.unlink()
    return key


def stem(key: str) -> str:
    return key[: -len(".mbox.gz")]


def on_disk(s: LocalStore) -> int:
    return sum(b.size for b in scan(s.root))


def keys(s: LocalStore) -> list[str]:
    return [b.stem for b in scan(s.root)]


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_the_oldest_bundles_go_first_to_stay_under_max_bytes(tmp_path: Path) -> None:
    clock, m = Clock(), Metrics()
    s = store(tmp_path, clock, m, max_bytes=400)
    placed = [put(s, tmp_path, T + i * HOUR, 85, "a" if i % 2 else "b") for i in range(4)]
    assert on_disk(s) == 400  # four of 100 bytes: 85 + index 10 + manifest 5
    newest = put(s, tmp_path, T + 10 * HOUR, 185)
    # The two oldest (across sets, by the time in the key) made room.
    assert keys(s) == [stem(k) for k in [*placed[2:], newest]]
    assert on_disk(s) == 400
    assert sample(m, "spamtrap_retention_deleted_total", reason="bytes") == 2
    assert sample(m, "spamtrap_retention_deleted_bytes_total", reason="bytes") == 200
    assert sample(m, "spamtrap_store_bytes") == 400


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=25))
def test_disk_use_never_exceeds_the_bound(tmp_path: Path, sizes: list[int]) -> None:
    clock = Clock()
    root = tmp_path / "bundles"
    for old in root.glob("*/*"):
        old.unlink()
    s = store(tmp_path, clock, max_bytes=1000)
    seen_before: list[int] = []
    real_place = s._place

    def checked_place(key: str, path: str, manifest: bytes, index: str | None) -> None:
        # The room made, before the files appear: what is there plus what comes.
        incoming = os.path.getsize(path) + len(manifest) + os.path.getsize(str(index))
        seen_before.append(on_disk(s) + incoming)
        real_place(key, path, manifest, index)

    s._place = checked_place  # type: ignore[method-assign]
    for n, size in enumerate(sizes):
        put(s, tmp_path, T + n, size)
        assert on_disk(s) <= 1000
        assert scan(s.root)[-1].size == size + 15  # the newest is always kept
    assert len(seen_before) == len(sizes) and max(seen_before) <= 1000


def test_a_bundle_goes_manifest_first_then_bundle_then_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(tmp_path, Clock(), max_bytes=150)
    first = put(s, tmp_path, T, 85)
    removed: list[str] = []
    real_unlink = os.unlink

    def recording_unlink(path: Any, *args: Any, **kw: Any) -> None:
        removed.append(os.path.relpath(path, s.root))
        real_unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    put(s, tmp_path, T + 1, 85)
    in_store = [r for r in removed if not r.startswith("..")]  # not the test's own files
    assert in_store == [manifest_key(first), first, index_key(first)]


def test_bundles_older_than_max_age_go_on_the_timer_and_at_each_put(tmp_path: Path) -> None:
    clock, m = Clock(), Metrics()
    clock.advance(T)
    s = store(tmp_path, clock, m, max_age=24 * HOUR)
    old = put(s, tmp_path, T - 23 * HOUR, 10)
    new = put(s, tmp_path, T, 10)
    assert len(keys(s)) == 2
    clock.advance(HOUR - SWEEP_INTERVAL)
    assert len(keys(s)) == 2  # 23h59m old: kept
    clock.advance(SWEEP_INTERVAL)  # the sweep runs: 24h old
    assert keys(s) == [stem(new)]
    assert stem(old) not in keys(s)
    assert sample(m, "spamtrap_retention_deleted_total", reason="age") == 1
    put(s, tmp_path, T - 48 * HOUR, 10)  # a bundle from a long outage: too old on arrival
    assert keys(s) == [stem(new)]
    assert sample(m, "spamtrap_retention_deleted_total", reason="age") == 2
    s.close()
    assert s._sweeper is not None and not s._sweeper.running


def test_leftovers_without_a_manifest_count_and_go_too(tmp_path: Path) -> None:
    s = store(tmp_path, Clock(), max_bytes=200)
    orphan = bundle_key("all", T - HOUR, "node1")
    os.makedirs(os.path.join(s.root, "all"))
    Path(s.root, orphan).write_bytes(b"x" * 120)  # a crash before its manifest
    Path(s.root, "all", ".tmpfile.abc.tmp").write_bytes(b"t" * 50)  # a put in progress
    put(s, tmp_path, T, 85)
    assert not Path(s.root, orphan).exists()
    assert Path(s.root, "all", ".tmpfile.abc.tmp").exists()  # not the store's to judge
    assert on_disk(s) == 100


def test_a_bundle_bigger_than_the_bound_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    s = store(tmp_path, Clock(), max_bytes=200)
    put(s, tmp_path, T, 85)
    part = tmp_path / "big"
    part.write_bytes(b"b" * 300)
    key = bundle_key("all", T + 1, "node1")
    failures: list[Any] = []
    s.put(key, str(part), b"{}", None).addErrback(failures.append)
    assert failures and failures[0].check(RetentionError)
    assert "store.retention.max_bytes (200)" in str(failures[0].value)
    assert len(keys(s)) == 1 and on_disk(s) == 100


def test_without_retention_nothing_is_deleted(tmp_path: Path) -> None:
    s = LocalStore(str(tmp_path / "bundles"), cast(Any, Clock()), cast(Any, SyncPool()))
    for i in range(5):
        put(s, tmp_path, T + i, 100)
    assert s.retention is None and len(keys(s)) == 5


def test_retention_with_an_s3_store_is_a_config_error(tmp_path: Path) -> None:
    cfg = StoreConfig(retention=RetentionConfig(max_age=86400.0))
    with pytest.raises(StoreConfigError, match="lifecycle rules"):
        open_store("s3://bucket/p", str(tmp_path), cast(Any, Clock()), cast(Any, SyncPool()), cfg)
    local = open_store(None, str(tmp_path), cast(Any, Clock()), cast(Any, SyncPool()), cfg)
    assert isinstance(local, LocalStore) and local.retention is not None
    local.close()
