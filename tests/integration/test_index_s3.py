"""The S3 store puts a bundle's index between the object and the manifest
(moto on loopback), with the index's own Content-Type."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.python.threadpool import ThreadPool

from spamtrap.store import bundle_key, index_key, manifest_key
from tests.support.s3 import (  # the S3 harness and its fixtures
    RecordingAgent,
    T,
    bundle_file,
    client,
    make_store,
    manifest_for,
)
from tests.support.s3 import aws_env as aws_env
from tests.support.s3 import moto as moto
from tests.support.s3 import pool as pool


@pytest_twisted.ensureDeferred
async def test_the_index_is_put_after_the_object_and_before_the_manifest(
    moto: str, pool: ThreadPool, tmp_path: Path
) -> None:
    agent = RecordingAgent()
    store = make_store(moto, pool, "indexed", agent)
    path, data = bundle_file(tmp_path, 50_000, 7)
    index = tmp_path / "index.part"
    index.write_bytes(b'{"offset":0,"length":50000}\n')
    key = bundle_key("all", T, "node1")
    await store.put(key, str(path), manifest_for(key, data), str(index))

    targets = [t for m, t, code in agent.calls() if m == "PUT" and 200 <= code < 300]
    assert [t.rsplit("/", 2)[-2:] for t in targets] == [
        k.split("/") for k in (key, index_key(key), manifest_key(key))
    ]
    s3 = client(moto, "testkey", "testsecret")
    got = s3.get_object(Bucket="traps", Key=f"indexed/{index_key(key)}")
    assert got["Body"].read() == index.read_bytes()
    assert got["ContentType"] == "application/x-ndjson"
