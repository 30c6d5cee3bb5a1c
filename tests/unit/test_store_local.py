from __future__ import annotations

import calendar
import json
import os
import re
from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.store import (
    KEY_RE,
    LocalFile,
    StoreClosedError,
    StoreConfigError,
    bundle_key,
    manifest_key,
    open_store,
)
from spamtrap.store.local import LocalStore
from spamtrap.testing import SyncPool, manifest_for

T = calendar.timegm((2026, 11, 22, 13, 31, 15))
# The documented name: <set>/<UTC ISO-8601 to seconds>.<node>.<base62 16>.mbox.gz
DOCUMENTED = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.[^./]+\.[0-9A-Za-z]{16}\.mbox\.gz$"
)


class FakeReactor(Clock):
    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def result_of(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def store(tmp_path: Any) -> LocalStore:
    pool = cast(Any, SyncPool())
    return LocalStore(str(tmp_path / "bundles"), FakeReactor(), pool)


def make_source(tmp_path: Any, data: bytes = b"\x1f\x8bgzip bytes") -> str:
    path = str(tmp_path / "work.part")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_bundle_key_matches_documented_name() -> None:
    key = bundle_key("all", T, "node1")
    assert DOCUMENTED.match(key), key
    assert key.startswith("all/2026-11-22T13:31:15.node1.")
    assert KEY_RE.fullmatch(key)
    assert bundle_key("all", T, "node1") != key  # the random part differs


@pytest.mark.parametrize("bad", ["", "a/b", "../x", ".hidden", "-x", "sp ace", "é"])
def test_bundle_key_rejects_bad_set_names(bad: str) -> None:
    with pytest.raises(ValueError):
        bundle_key(bad, T, "node1")


def test_bundle_key_rejects_bad_node_name() -> None:
    with pytest.raises(ValueError):
        bundle_key("all", T, "a/b")


def test_manifest_key() -> None:
    key = "all/2026-11-22T13:31:15.node.AbCdEfGhIjKlMnOp.mbox.gz"
    assert manifest_key(key) == "all/2026-11-22T13:31:15.node.AbCdEfGhIjKlMnOp.json"
    with pytest.raises(ValueError):
        manifest_key("all/x.json")


def test_open_store_default_and_file_url(tmp_path: Any) -> None:
    pool = cast(Any, SyncPool())
    default = open_store(None, str(tmp_path), FakeReactor(), pool)
    assert isinstance(default, LocalStore)
    assert default.root == os.path.join(str(tmp_path), "bundles")
    local = open_store(f"file://{tmp_path}/my%20store", "/unused", FakeReactor(), pool)
    assert isinstance(local, LocalStore)
    assert local.root == os.path.join(str(tmp_path), "my store")
    assert local.url("all/x.mbox.gz") is None
    assert str(tmp_path) in local.describe()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://relative/path", "three slashes"),
        ("file:relative", "three slashes"),
        ("http://example.invalid/", "unsupported scheme 'http'"),
        ("/plain/path", "unsupported scheme ''"),
    ],
)
def test_open_store_rejects(url: str, message: str) -> None:
    pool = cast(Any, SyncPool())
    with pytest.raises(StoreConfigError, match=re.escape(message)):
        open_store(url, "/data", FakeReactor(), pool)


def test_put_writes_object_then_manifest(
    store: LocalStore, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = bundle_key("all", T, "node1")
    src = make_source(tmp_path)
    placed: list[str] = []
    real_replace = os.replace

    def recording_replace(a: str, b: str) -> None:
        placed.append(os.path.relpath(b, store.root))
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", recording_replace)
    result_of(store.put(key, src, b'{"m": 1}\n'))
    assert placed == [key, manifest_key(key)]
    # The caller's file is still there, and deleting it leaves ours intact.
    assert os.path.exists(src)
    os.unlink(src)
    obj = store.path_for(key)
    assert obj is not None
    with open(obj, "rb") as f:
        assert f.read() == b"\x1f\x8bgzip bytes"
    man = store.path_for(manifest_key(key))
    assert man is not None
    with open(man, "rb") as f:
        assert f.read() == b'{"m": 1}\n'
    # No temp files left behind.
    assert sorted(os.listdir(os.path.join(store.root, "all"))) == sorted(
        [key.split("/")[1], manifest_key(key).split("/")[1]]
    )


def test_put_copies_when_hard_link_fails(
    store: LocalStore, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(a: str, b: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    key = bundle_key("all", T, "node1")
    src = make_source(tmp_path, b"x" * 3_000_000)
    result_of(store.put(key, src, b"{}\n"))
    obj = store.path_for(key)
    assert obj is not None
    assert os.stat(obj).st_ino != os.stat(src).st_ino
    with open(obj, "rb") as f:
        assert f.read() == b"x" * 3_000_000


@pytest.mark.parametrize("key", ["../x.mbox.gz", "all/x.mbox.gz", "all/../../etc/passwd"])
def test_put_rejects_bad_keys(store: LocalStore, tmp_path: Any, key: str) -> None:
    with pytest.raises(ValueError, match="not a bundle key"):
        result_of(store.put(key, make_source(tmp_path), b"{}\n"))
    assert not os.path.exists(store.root) or os.listdir(store.root) == []


def test_put_failure_writes_no_manifest(store: LocalStore, tmp_path: Any) -> None:
    key = bundle_key("all", T, "node1")
    with pytest.raises(FileNotFoundError):
        result_of(store.put(key, str(tmp_path / "missing"), b"{}\n"))
    assert store.path_for(manifest_key(key)) is None


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "/etc/passwd",
        "all/../../x",
        "all/../all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz",
        "%2e%2e/all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz",
        "all/%2e%2e",
        "",
        "all",
        "all/",
        "all//2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz",
        "/all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz",
        "all\\2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz",
        "all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz\0",
        "all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz/",
        "all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox",
        "all/.2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz.x.tmp",
    ],
)
def test_path_for_rejects(store: LocalStore, key: str) -> None:
    real = "all/2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz"
    os.makedirs(os.path.join(store.root, "all"))
    with open(os.path.join(store.root, real), "wb") as f:
        f.write(b"x")
    assert store.path_for(real) == os.path.join(store.root, real)
    assert store.path_for(key) is None


def test_path_for_missing_file(store: LocalStore) -> None:
    assert store.path_for(bundle_key("all", T, "node1")) is None


def test_path_for_refuses_symlinked_set_leading_outside(store: LocalStore, tmp_path: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    name = "2026-11-22T13:31:15.node1.AbCdEfGhIjKlMnOp.mbox.gz"
    (outside / name).write_bytes(b"secret")
    os.makedirs(store.root)
    os.symlink(str(outside), os.path.join(store.root, "evil"))
    assert store.path_for(f"evil/{name}") is None


def test_list_manifests_newest_first_skipping_broken(store: LocalStore, tmp_path: Any) -> None:
    keys = [bundle_key("all", T + dt, "node1") for dt in (0, 7200, 3600)]
    for key in keys:
        doc = manifest_for(key).to_json_bytes()
        result_of(store.put(key, make_source(tmp_path), doc))
    broken = bundle_key("all", T + 9999, "node1")
    result_of(store.put(broken, make_source(tmp_path), b"{not json"))
    invalid = bundle_key("all", T + 9998, "node1")  # JSON, but not a manifest
    result_of(store.put(invalid, make_source(tmp_path), json.dumps({"key": invalid}).encode()))
    other = bundle_key("other", T, "node1")
    result_of(store.put(other, make_source(tmp_path), b"{}\n"))
    listed = result_of(store.list_manifests("all"))
    assert listed == [manifest_for(keys[i]) for i in (1, 2, 0)]
    assert store.read_manifests("all") == listed
    assert result_of(store.list_manifests("nothing-here")) == []
    with pytest.raises(ValueError):
        result_of(store.list_manifests("../all"))


def test_listing_runs_in_the_stores_own_pool(tmp_path: Any) -> None:
    pool = SyncPool()
    store = LocalStore(str(tmp_path / "bundles"), FakeReactor(), cast(Any, pool))
    result_of(store.list_manifests("all"))
    assert pool.calls == 1


def stored_key(store: LocalStore, tmp_path: Any) -> str:
    key = bundle_key("all", T, "node1")
    result_of(store.put(key, make_source(tmp_path), b"{}\n"))
    return key


def test_open_download_gives_the_checked_file(store: LocalStore, tmp_path: Any) -> None:
    key = stored_key(store, tmp_path)
    download = store.open_download(key)
    assert download == LocalFile(os.path.realpath(os.path.join(store.root, key)))
    assert isinstance(download, LocalFile)
    with open(download.path, "rb") as f:
        assert f.read() == b"\x1f\x8bgzip bytes"
    manifest = store.open_download(manifest_key(key))
    assert isinstance(manifest, LocalFile) and manifest.path.endswith(".json")
    assert store.open_download(bundle_key("all", T, "node1")) is None  # not stored
    assert store.open_download(f"../{key}") is None
    assert store.served_by_web is True


def test_open_download_refuses_a_symlinked_bundle_leading_outside(
    store: LocalStore, tmp_path: Any
) -> None:
    key = stored_key(store, tmp_path)
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    evil = bundle_key("all", T + 1, "node1")
    os.symlink(str(outside), os.path.join(store.root, evil))
    assert store.open_download(evil) is None
    # A symlink to another file inside the store is served as that file.
    inside = bundle_key("all", T + 2, "node1")
    os.symlink(os.path.join(store.root, key), os.path.join(store.root, inside))
    assert store.open_download(inside) == store.open_download(key)


def test_open_download_refuses_a_directory(store: LocalStore, tmp_path: Any) -> None:
    stored_key(store, tmp_path)
    directory = bundle_key("all", T + 3, "node1")
    os.makedirs(os.path.join(store.root, directory))
    assert store.open_download(directory) is None


def test_close_stops_the_pool_and_refuses_more_work(tmp_path: Any) -> None:
    pool = SyncPool()
    pool.start()
    store = LocalStore(str(tmp_path / "bundles"), FakeReactor(), cast(Any, pool))
    result_of(store.close())
    assert pool.joined and not pool.started
    with pytest.raises(StoreClosedError):
        result_of(store.put(bundle_key("all", T, "node1"), make_source(tmp_path), b"{}\n"))
    with pytest.raises(StoreClosedError):
        result_of(store.list_manifests("all"))
    result_of(store.close())  # a second close is harmless
