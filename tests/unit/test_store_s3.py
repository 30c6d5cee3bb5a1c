"""The S3 store without a server: store URLs, endpoints and regions,
redirects, part sizes, error bodies. Against moto and SeaweedFS:
tests/integration/test_store_s3.py.

Every test runs with the machine's AWS settings removed, IMDS disabled and
explicit endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from spamtrap.config import StoreConfig
from spamtrap.store import (
    Redirect,
    StoreConfigError,
    open_store,
)
from spamtrap.store.s3 import S3Store
from spamtrap.store.s3_multipart import MIN_PART
from spamtrap.store.s3_wire import S3Error, parse_error
from tests.support.s3 import MIB
from tests.support.s3 import aws_env as aws_env  # the fixtures
from tests.support.s3 import pool as pool


def test_open_store_gives_an_s3_store_for_s3_urls(pool: ThreadPool) -> None:
    config = StoreConfig(endpoint="http://127.0.0.1:9/", region="eu-west-3")
    store = open_store("s3://traps/a/b/", "/unused", reactor, pool, config=config)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("traps", "a/b")
    assert store.describe() == "s3 bucket traps prefix a/b at http://127.0.0.1:9"
    key = "all/2026-11-22T13:31:15.node1.AAAAAAAAAAAAAAAA.mbox.gz"
    assert store.url(key) == (
        "http://127.0.0.1:9/traps/a/b/all/2026-11-22T13%3A31%3A15.node1.AAAAAAAAAAAAAAAA.mbox.gz"
    )
    bare = open_store("s3://traps", "/unused", reactor, pool, config=config)
    assert isinstance(bare, S3Store) and bare.prefix == ""
    assert "prefix (none)" in bare.describe()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "use s3://bucket"),
        ("s3://a/", "use s3://bucket"),  # one letter: no bucket name
        ("s3://traps/p?x=1", "no query"),
        ("s3://traps/a//b", "prefix segments"),
        ("s3://traps/a/../b", "prefix segments"),
    ],
)
def test_bad_s3_urls_are_refused(pool: ThreadPool, url: str, message: str) -> None:
    with pytest.raises(StoreConfigError, match=message):
        open_store(url, "/unused", reactor, pool, config=StoreConfig())


def store_with(pool: ThreadPool, env: dict[str, str], **config: Any) -> S3Store:
    return S3Store("traps", "p", reactor, pool, StoreConfig(**config), environ=env)


KEY = "all/2026-11-22T13:31:15.n.AAAAAAAAAAAAAAAA.mbox.gz"


def test_endpoint_and_region_follow_the_aws_conventions(pool: ThreadPool) -> None:
    env = {
        "AWS_ENDPOINT_URL_S3": "http://s3.local:8333",
        "AWS_ENDPOINT_URL": "http://all.local",
        "AWS_REGION": "eu-north-1",
        "AWS_DEFAULT_REGION": "us-west-2",
    }
    # The config first, then the S3-specific variable, then the general one.
    assert "at http://cfg.local" in store_with(pool, env, endpoint="http://cfg.local").describe()
    assert "at http://s3.local:8333" in store_with(pool, env).describe()
    del env["AWS_ENDPOINT_URL_S3"]
    assert "at http://all.local" in store_with(pool, env).describe()
    # No endpoint: AWS itself, by region (AWS_REGION before AWS_DEFAULT_REGION).
    del env["AWS_ENDPOINT_URL"]
    assert store_with(pool, env).url(KEY) == (
        "https://s3.eu-north-1.amazonaws.com/traps/p/all/"
        "2026-11-22T13%3A31%3A15.n.AAAAAAAAAAAAAAAA.mbox.gz"
    )
    del env["AWS_REGION"]
    assert "s3.us-west-2.amazonaws.com" in store_with(pool, env).describe()
    assert "s3.ap-south-1.amazonaws.com" in store_with(pool, env, region="ap-south-1").describe()
    # Region only in ~/.aws/config: known after start, not before.
    unresolved = store_with(pool, {})
    assert unresolved.url(KEY) is None
    assert "region from the AWS config" in unresolved.describe()


def test_open_download_redirects_to_the_public_object(pool: ThreadPool) -> None:
    store = store_with(pool, {}, endpoint="http://x", public_url="https://cdn.example/t/")
    assert store.served_by_web is False
    assert store.open_download(KEY) == Redirect(store.url(KEY) or "")
    assert store.open_download(KEY[: -len(".mbox.gz")] + ".json") == Redirect(
        "https://cdn.example/t/p/all/2026-11-22T13%3A31%3A15.n.AAAAAAAAAAAAAAAA.json"
    )
    for bad in ("all/x.mbox.gz", f"../{KEY}", KEY + "/", ""):
        assert store.open_download(bad) is None
    # AWS with the region not known yet: no URL, so nothing to redirect to.
    assert store_with(pool, {}).open_download(KEY) is None


def test_url_styles_and_public_url(pool: ThreadPool) -> None:
    virtual = store_with(pool, {}, endpoint="https://objects.example", path_style=False)
    assert virtual.url(KEY) == (
        "https://traps.objects.example/p/all/2026-11-22T13%3A31%3A15.n.AAAAAAAAAAAAAAAA.mbox.gz"
    )
    public = store_with(pool, {}, endpoint="http://x", public_url="https://cdn.example/t/")
    assert public.url(KEY) == (
        "https://cdn.example/t/p/all/2026-11-22T13%3A31%3A15.n.AAAAAAAAAAAAAAAA.mbox.gz"
    )


@pytest.mark.parametrize("endpoint", ["ftp://x", "s3.local:8333", "http://", "http://h/?q=1"])
def test_bad_endpoints_are_refused(pool: ThreadPool, endpoint: str) -> None:
    with pytest.raises(StoreConfigError, match="store.endpoint"):
        store_with(pool, {}, endpoint=endpoint)
    with pytest.raises(StoreConfigError, match="AWS_ENDPOINT_URL_S3"):
        store_with(pool, {"AWS_ENDPOINT_URL_S3": endpoint})


def test_part_size_is_the_threshold_but_5_mib_at_least_and_10000_parts_at_most(
    pool: ThreadPool,
) -> None:
    assert store_with(pool, {}, multipart_threshold=MIB).part_size(50 * MIB) == MIN_PART
    store = store_with(pool, {}, multipart_threshold=16 * MIB)
    assert store.part_size(100 * MIB) == 16 * MIB
    huge = 200_000 * MIB  # 12,500 parts of 16 MiB: too many
    assert store.part_size(huge) == 20 * MIB and huge / store.part_size(huge) <= 10_000


def test_error_bodies_are_parsed() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code>'
        b"<Message>The request signature we calculated does not match</Message></Error>"
    )
    assert parse_error(body) == (
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match",
    )
    assert parse_error(b"") == (None, "(no error body)")
    assert parse_error(b"<html>bad gateway</html>") == (None, "<html>bad gateway</html>")
    error = S3Error(403, "InvalidAccessKeyId", "no such key", "s3://traps/k", "PutObject")
    assert (
        str(error) == "InvalidAccessKeyId for key s3://traps/k (PutObject, HTTP 403): no such key"
    )
