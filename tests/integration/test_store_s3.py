"""The S3 store against moto (server mode, fast) and a real SeaweedFS.

Only 127.0.0.1 is ever contacted: every test runs with the machine's AWS
settings removed, IMDS disabled and explicit endpoints."""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from botocore.credentials import Credentials
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IAgent
from zope.interface import implementer

from spamtrap.bundle.mbox import entry
from spamtrap.bundle.sets import BundleSet
from spamtrap.config import RotateConfig, SetConfig, StoreConfig
from spamtrap.store import (
    StoreClosedError,
    bundle_key,
    manifest_key,
)
from spamtrap.store.s3 import S3Store
from spamtrap.store.s3_wire import S3Error
from tests.support import poll
from tests.support.bundles import UploadMetrics
from tests.support.s3 import MIB, RecordingAgent, T, bundle_file, client, make_store, manifest_for
from tests.support.s3 import aws_env as aws_env  # the fixtures
from tests.support.s3 import moto as moto
from tests.support.s3 import pool as pool
from tests.support.seaweedfs import SeaweedFS
from tests.support.seaweedfs import seaweedfs as seaweedfs  # the fixture


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    # The real reactor and real servers: poll, briefly.
    await poll.until(predicate, timeout, what, interval=0.02)


def completes_object(method: str, target: str, key: str) -> bool:
    """Is this the request that makes the object ``key`` whole?"""
    path, _, query = target.partition("?")
    if not path.endswith("/" + key):
        return False
    return (method == "PUT" and not query) or (method == "POST" and "uploadId=" in query)


def assert_object_before_manifest(agent: RecordingAgent, key: str) -> None:
    ok = [(m, t) for m, t, code in agent.calls() if 200 <= code < 300]
    objects = [i for i, (m, t) in enumerate(ok) if completes_object(m, t, key)]
    manifests = [i for i, (m, t) in enumerate(ok) if m == "PUT" and t.endswith(manifest_key(key))]
    assert len(objects) == 1 and len(manifests) == 1, (key, ok)
    assert objects[0] < manifests[0]


# -- configuration (no server) ----------------------------------------------------


# -- moto ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_small_put_writes_object_then_manifest(
    moto: str, pool: ThreadPool, tmp_path: Path
) -> None:
    agent = RecordingAgent()
    store = make_store(moto, pool, "small", agent)
    path, data = bundle_file(tmp_path, 100_000, 1)
    key = bundle_key("all", T, "node1")
    manifest = manifest_for(key, data)
    await store.put(key, str(path), manifest)

    assert [(m, code) for m, _, code in agent.calls()] == [("PUT", 200), ("PUT", 200)]
    assert_object_before_manifest(agent, key)
    s3 = client(moto, "testkey", "testsecret")
    obj = s3.get_object(Bucket="traps", Key=f"small/{key}")
    assert obj["ContentType"] == "application/gzip"
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == json.loads(manifest)["sha256"]
    doc = s3.get_object(Bucket="traps", Key=f"small/{manifest_key(key)}")
    assert doc["ContentType"] == "application/json"
    assert doc["Body"].read() == manifest
    assert path.exists()  # the caller's file is left alone


@pytest_twisted.ensureDeferred
async def test_big_put_is_a_multipart_upload(moto: str, pool: ThreadPool, tmp_path: Path) -> None:
    agent = RecordingAgent()
    store = make_store(moto, pool, "multi", agent, multipart_threshold=5 * MIB)
    path, data = bundle_file(tmp_path, 12 * MIB, 2)
    key = bundle_key("all", T, "node1")
    await store.put(key, str(path), manifest_for(key, data))

    calls = agent.calls()
    assert calls[0][0] == "POST" and calls[0][1].endswith(f"/{key}?uploads")
    parts = [(t, length) for m, t, _, length, _ in agent.log if "partNumber=" in t]
    assert sorted(length for _, length in parts) == [2 * MIB, 5 * MIB, 5 * MIB]
    assert calls[-2][0] == "POST" and "uploadId=" in calls[-2][1]  # complete
    assert calls[-1][:2] == ("PUT", f"/traps/multi/{manifest_key(key)}")
    assert_object_before_manifest(agent, key)
    s3 = client(moto, "testkey", "testsecret")
    got = s3.get_object(Bucket="traps", Key=f"multi/{key}")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert s3.list_multipart_uploads(Bucket="traps").get("Uploads", []) == []


@pytest_twisted.ensureDeferred
async def test_a_failed_part_fails_the_put_and_aborts_the_upload(
    moto: str, pool: ThreadPool, tmp_path: Path
) -> None:
    agent = RecordingAgent()
    agent.refuse = lambda method, target: "partNumber=2" in target
    store = make_store(moto, pool, "abort", agent, multipart_threshold=5 * MIB)
    path, data = bundle_file(tmp_path, 11 * MIB, 3)
    key = bundle_key("all", T, "node1")
    with pytest.raises(S3Error, match=r"ConnectionRefusedError for key s3://traps/abort/all/"):
        await store.put(key, str(path), manifest_for(key, data))
    await until(lambda: any(m == "DELETE" for m, _, _ in agent.calls()), "the abort")
    assert [c for c in agent.calls() if c[0] == "DELETE"][0][2] == 204
    assert not any(t.endswith(manifest_key(key)) for _, t, _ in agent.calls())
    s3 = client(moto, "testkey", "testsecret")
    assert s3.list_multipart_uploads(Bucket="traps").get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket="traps", Prefix="abort/").get("KeyCount") == 0


@pytest_twisted.ensureDeferred
async def test_list_manifests_newest_first_over_several_pages(
    moto: str, pool: ThreadPool, tmp_path: Path
) -> None:
    store = make_store(moto, pool, "listing")
    path, data = bundle_file(tmp_path, 1000, 4)
    manifests = []
    for i in range(5):
        key = bundle_key("all", T + 3600 * i, "node1")
        manifests.append(manifest_for(key, data))
        await store.put(key, str(path), manifests[-1])
    other = bundle_key("other", T + 99999, "node1")
    await store.put(other, str(path), manifest_for(other, data))
    s3 = client(moto, "testkey", "testsecret")
    damaged = manifest_key(bundle_key("all", T + 7200 * 9, "node1"))
    s3.put_object(Bucket="traps", Key=f"listing/{damaged}", Body=b"{not json")
    s3.put_object(Bucket="traps", Key="listing/all/stray.json", Body=b"{}")
    invalid = manifest_key(bundle_key("all", T + 7200 * 8, "node1"))  # JSON, not a manifest
    s3.put_object(Bucket="traps", Key=f"listing/{invalid}", Body=b'{"format": 1}')
    store.list_page_size = 3  # 12 keys under all/: four pages

    got = await store.list_manifests("all")
    assert [m.to_json_bytes() for m in got] == list(reversed(manifests))
    with pytest.raises(ValueError, match="invalid set name"):
        await store.list_manifests("../x")


@pytest_twisted.ensureDeferred
async def test_no_credentials_is_a_clear_error(moto: str, pool: ThreadPool, tmp_path: Path) -> None:
    agent = RecordingAgent()
    store = make_store(moto, pool, "none", agent, credentials=None)
    path, data = bundle_file(tmp_path, 10, 5)
    key = bundle_key("all", T, "node1")
    with pytest.raises(S3Error, match="NoCredentials for key s3://traps/none/all/.*AWS_PROFILE"):
        await store.put(key, str(path), manifest_for(key, data))
    assert agent.log == []


# -- SeaweedFS ---------------------------------------------------------------------


def anonymous_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback http
        body: bytes = response.read()
    return body


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_seaweedfs_round_trip_public_by_key_listing_denied(
    seaweedfs: SeaweedFS, pool: ThreadPool, tmp_path: Path
) -> None:
    agent = RecordingAgent()
    store = make_store(seaweedfs.endpoint, pool, "rt", agent, multipart_threshold=5 * MIB)
    keys = []
    for seed, size in ((6, 300_000), (7, 12 * MIB)):
        path, data = bundle_file(tmp_path, size, seed)
        key = bundle_key("all", T + seed, "node1")
        await store.put(key, str(path), manifest_for(key, data))
        keys.append(key)
    assert sum(1 for _, t, _ in agent.calls() if "partNumber=" in t) == 3
    s3 = seaweedfs.client()
    for key in keys:
        assert_object_before_manifest(agent, key)
        url = store.url(key)
        assert url is not None
        # Anyone who knows the key reads object and manifest, no credentials.
        doc = json.loads(anonymous_get(url[: -len(".mbox.gz")] + ".json"))
        body = anonymous_get(url)
        assert hashlib.sha256(body).hexdigest() == doc["sha256"] and len(body) == doc["size"]
        got = s3.get_object(Bucket="traps", Key=f"rt/{key}")["Body"].read()
        assert hashlib.sha256(got).hexdigest() == doc["sha256"]
    # Listing needs them.
    with pytest.raises(urllib.error.HTTPError) as denied:
        anonymous_get(f"{seaweedfs.endpoint}/traps?list-type=2&prefix=rt/")
    assert denied.value.code == 403
    listed = await store.list_manifests("all")
    assert [m.key for m in listed] == list(reversed(keys))


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_seaweedfs_credentials_from_the_environment_and_the_files(
    seaweedfs: SeaweedFS, pool: ThreadPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = bundle_file(tmp_path, 1000, 8)
    s3 = seaweedfs.client()

    async def put_with_the_chain(prefix: str) -> None:
        # No credentials given: botocore's chain finds them (in the pool).
        store = make_store(seaweedfs.endpoint, pool, prefix, credentials=None)
        key = bundle_key("all", T, "node1")
        await store.put(key, str(path), manifest_for(key, data))
        assert s3.head_object(Bucket="traps", Key=f"{prefix}/{manifest_key(key)}")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    await put_with_the_chain("env")

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n"
        f"[traps]\naws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "traps")
    await put_with_the_chain("file")

    monkeypatch.delenv("AWS_PROFILE")  # [default] holds an unknown key
    with pytest.raises(S3Error, match="InvalidAccessKeyId for key s3://traps/bad/all/"):
        await put_with_the_chain("bad")


class LogCapture:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "error" in event and "storing" in event.get("log_format", ""):
            self.errors.append(str(event["error"]))


@pytest.fixture
def store_log() -> Iterator[LogCapture]:
    capture: Any = LogCapture()  # an ILogObserver; zope interfaces do not type-check
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def bundle_set(
    store: S3Store, pool: ThreadPool, work: Path, clock: Any, acked: list[list[Any]], **rotate: Any
) -> tuple[BundleSet, UploadMetrics]:
    metrics = UploadMetrics()
    bundles = BundleSet(
        SetConfig(name="all", rotate=RotateConfig(**rotate)),
        "node1",
        str(work),
        store,
        metrics,
        reactor,
        pool,
        acked.append,
        clock=clock,
        store_config=StoreConfig(retry_initial=0.1, retry_max=0.4),
    )
    return bundles, metrics


def waiting(metrics: UploadMetrics) -> float | None:
    return metrics.registry.get_sample_value("spamtrap_bundles_waiting", {"set": "all"})


def waits(metrics: UploadMetrics, n: int) -> Callable[[], bool]:
    return lambda: waiting(metrics) == n


def errors(metrics: UploadMetrics) -> float:
    return metrics.registry.get_sample_value("spamtrap_store_errors_total", {"set": "all"}) or 0


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_seaweedfs_wrong_credentials_are_logged_then_retried(
    seaweedfs: SeaweedFS, pool: ThreadPool, tmp_path: Path, store_log: LogCapture
) -> None:
    credentials = Credentials(seaweedfs.access_key, "not-the-secret")
    store = make_store(seaweedfs.endpoint, pool, "creds", credentials=credentials)
    clock = Clock()
    acked: list[list[Any]] = []
    bundles, metrics = bundle_set(store, pool, tmp_path / "work", clock, acked)
    msg = b"Subject: spam\r\n\r\nbuy now\r\n"
    await deferToThreadPool(reactor, pool, bundles.add, entry("s@x", T, msg), T, "token")
    bundles.rotate()
    await until(lambda: errors(metrics) == 1, "the first failure")
    assert "SignatureDoesNotMatch for key s3://traps/creds/all/" in store_log.errors[0]

    credentials.secret_key = seaweedfs.secret_key  # the operator fixes them
    clock.advance(0.1)  # the first retry is due within retry_initial
    await until(lambda: acked == [["token"]], "the retry to store the bundle")
    assert errors(metrics) == 1
    listed = await store.list_manifests("all")
    assert [m.messages for m in listed] == [1]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_seaweedfs_killed_mid_upload_then_the_backlog_uploads_by_itself(
    seaweedfs: SeaweedFS, pool: ThreadPool, tmp_path: Path
) -> None:
    killed: list[str] = []

    def kill_after_the_first_part(item: tuple[Any, ...]) -> None:
        if "partNumber=1&" in item[1] and not killed:
            killed.append(item[1])
            seaweedfs.stop()

    agent = RecordingAgent(kill_after_the_first_part)
    store = make_store(
        seaweedfs.endpoint, pool, "outage", agent, multipart_threshold=5 * MIB, max_concurrency=1
    )
    acked: list[list[Any]] = []
    bundles, metrics = bundle_set(store, pool, tmp_path / "work", reactor, acked)
    big = random.Random(9).randbytes(12 * MIB)
    await deferToThreadPool(reactor, pool, bundles.add, entry("s@x", T, big), T, 0)
    bundles.rotate()
    await until(lambda: errors(metrics) >= 2, "the killed upload to fail and be retried")
    assert killed and acked == []
    # More bundles while the store is down: they wait (nothing skipped).
    for token in (1, 2):
        msg = b"Subject: %d\r\n\r\nspam\r\n" % token
        await deferToThreadPool(reactor, pool, bundles.add, entry("s@x", T, msg), T, token)
        bundles.rotate()
        await until(waits(metrics, token + 1), f"bundle {token} to wait")
    # Not a poll: real retries against a real, stopped server, for a while.
    await task.deferLater(reactor, 0.5, lambda: None)  # retries go on meanwhile
    assert acked == [] and waiting(metrics) == 3

    seaweedfs.start()  # same ports, same -dir
    await until(lambda: len(acked) == 3, "the backlog to upload", timeout=30)
    assert sorted(t for tokens in acked for t in tokens) == [0, 1, 2]
    assert not any(
        metrics.registry.get_sample_value(
            "spamtrap_bundles_skipped_total", {"set": "all", "reason": r}
        )
        for r in ("busy", "queue-full", "backlog-full")
    )
    listed = await store.list_manifests("all")
    assert len(listed) == 3
    s3 = seaweedfs.client()
    for doc in listed:
        assert_object_before_manifest(agent, doc.key)
        body = s3.get_object(Bucket="traps", Key=f"outage/{doc.key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == doc.sha256 and len(body) == doc.size
    assert os.listdir(tmp_path / "work" / "all") == []


@implementer(IAgent)
class SilentAgent:
    """An agent whose requests never get an answer (until cancelled)."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Any = None,
        bodyProducer: Any = None,  # noqa: N803 - IAgent's name
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d


@pytest_twisted.ensureDeferred
async def test_close_cancels_what_is_in_flight_and_stops_the_pool(tmp_path: Path) -> None:
    own = ThreadPool(minthreads=1, maxthreads=2, name="test-s3-close")
    own.start()
    agent = SilentAgent()
    recording: Any = agent  # an IAgent; zope interfaces do not type-check
    store = S3Store(
        "traps",
        "p",
        reactor,
        own,
        StoreConfig(endpoint="http://127.0.0.1:9"),
        environ={},
        credentials=Credentials("k", "s"),
        agent=recording,
    )
    path, data = bundle_file(tmp_path, 1000, 11)
    put = store.put(KEY, str(path), manifest_for(KEY, data))
    listing = store.list_manifests("all")
    await until(lambda: len(agent.pending) == 2, "both requests sent")
    await store.close()
    assert own.joined
    for d in (put, listing):
        with pytest.raises(StoreClosedError, match="the store was closed"):
            await d
    with pytest.raises(StoreClosedError):
        await store.put(KEY, str(path), manifest_for(KEY, data))
    with pytest.raises(StoreClosedError):
        await store.list_manifests("all")


KEY = "all/2026-11-22T13:31:15.n.AAAAAAAAAAAAAAAA.mbox.gz"
