"""The web tests' store layout, FakeStore, config and request helpers, shared by
the in-memory tests (tests/unit/test_web.py, test_published.py) and the
loopback ones (tests/integration/test_web.py)."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadable import isInIOThread
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from spamtrap import testing
from spamtrap.bundle.manifest import Manifest
from spamtrap.config import Config, SetConfig
from spamtrap.store import Download, LocalFile
from spamtrap.testing import SyncPool

TOKEN = "tok-private-0123456789"


class InlineReactor:
    """Just enough reactor for deferToThreadPool, on one thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class FakeStore:
    """The Store contract, naively implemented: downloads trust the key;
    listings run in the store's own ``pool`` (a SyncPool unless given)."""

    served_by_web = True

    def __init__(
        self,
        root: Path,
        manifests: dict[str, list[Manifest]],
        pool: Any = None,
        reactor: Any = None,
    ) -> None:
        self._root = str(root)
        self.manifests = manifests
        self.pool = pool if pool is not None else SyncPool()
        self._reactor = reactor if reactor is not None else InlineReactor()
        self.listed_in_reactor_thread: list[bool] = []
        self.fail_listing: Exception | None = None

    def describe(self) -> str:
        return "fake store"

    def url(self, key: str) -> str | None:
        return None

    def put(
        self, key: str, path: str, manifest: bytes, index: str | None = None
    ) -> defer.Deferred[None]:
        raise NotImplementedError("the web layer never stores")

    def open_download(self, key: str) -> Download:
        path = os.path.join(self._root, key)
        return LocalFile(path) if os.path.exists(path) else None

    def list_manifests(self, set_name: str) -> defer.Deferred[list[Manifest]]:
        return deferToThreadPool(self._reactor, self.pool, self._list, set_name)

    def _list(self, set_name: str) -> list[Manifest]:
        self.listed_in_reactor_thread.append(isInIOThread())
        if self.fail_listing is not None:
            raise self.fail_listing
        return self.manifests.get(set_name, [])

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def private_manifests() -> list[Manifest]:
    return [manifest_for(f"private/{n}.mbox.gz", n.encode()) for n in PRIVATE_NAMES]


def listing_request() -> DummyRequest:
    request = DummyRequest([b"bundles", b"private", b""])
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {TOKEN}".encode()])
    return request


def render(site: Any, request: DummyRequest) -> Any:
    result = site.getResourceFor(request).render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return result


PRIVATE_NAMES = [  # newest first
    "2026-03-01T00:00:00.node1.ZZZZZZZZZZZZZZZZ",
    "2026-02-01T00:00:00.node2.YYYYYYYYYYYYYYYY",
    "2026-01-01T00:00:00.node1.XXXXXXXXXXXXXXXX",
]


def manifest_for(key: str, data: bytes) -> Manifest:
    # Any key: the feed tests hand the web layer keys no store would list.
    return Manifest(
        set=key.split("/")[0],
        key=key,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        messages=1,
        first_received="2026-01-02T03:00:00Z",
        last_received="2026-01-02T03:00:45Z",
        node="node1",
    )


SECRET = b"SECRET-OUTSIDE-THE-STORE"


NAME = "2026-01-02T03:04:05.node1.AbCdEfGhIjKlMnOp"


@dataclass
class Layout:
    root: Path
    bundle: bytes  # all/NAME.mbox.gz
    manifest: bytes  # all/NAME.json
    files: dict[str, bytes] = field(default_factory=dict)  # every key in the store


def build_store(base: Path) -> Layout:
    """A store under base/store, with secrets beside it that no request may
    reach: same suffixes as real keys, so only the path checks stop them."""
    root = base / "store"
    (root / "all").mkdir(parents=True)
    (root / "private").mkdir()
    for name in ("secret.mbox.gz", "secret.json", "all.mbox.gz"):
        (base / name).write_bytes(SECRET)
    # A symlink inside the store that points out of it.
    os.symlink(base / "secret.mbox.gz", root / "all" / "evil.mbox.gz")
    # A hidden file, as a store's write in progress might be: never served.
    (root / "all" / ".partial.mbox.gz").write_bytes(SECRET)
    # Larger than a few 64 KiB producer chunks, and incompressible.
    bundle = gzip.compress(os.urandom(300_000))
    key = f"all/{NAME}.mbox.gz"
    manifest = manifest_for(key, bundle).to_json_bytes()
    layout = Layout(root, bundle, manifest)
    layout.files[key] = bundle
    layout.files[f"all/{NAME}.json"] = manifest
    for name in PRIVATE_NAMES:
        layout.files[f"private/{name}.mbox.gz"] = name.encode()
    for key, data in layout.files.items():
        (root / key).write_bytes(data)
    return layout


def make_config() -> Config:
    config = testing.config(
        http__public_url=PUBLIC_URL,
        sets=[
            SetConfig(name="all"),
            SetConfig(name="private", token=TOKEN, private=True),
            SetConfig(name="shared", token=SHARED_TOKEN),
        ],
    )
    return config


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


SHARED_TOKEN = "tok-shared-5555555555"


PUBLIC_URL = "https://spam.example:8443/"  # trailing slash on purpose
