"""The S3 store tests' harness: a clean AWS environment, the store's pool, a
moto server on 127.0.0.1, a recording agent and the store built on them.
A test module takes the fixtures by importing them (``moto as moto``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from botocore.credentials import Credentials
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from zope.interface import implementer

from spamtrap import testing
from spamtrap.config import StoreConfig
from spamtrap.store.s3 import S3Store
from tests.support.seaweedfs import clean_env

MIB = 1024 * 1024


T = 1795355475.0  # 2026-11-22T13:11:15Z


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(minthreads=1, maxthreads=4, name="test-s3")
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with bucket ``traps``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client(endpoint, "testkey", "testsecret").create_bucket(Bucket="traps")
    yield endpoint
    server.stop()


def client(endpoint: str, access: str, secret: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}),
    )


@implementer(IAgent)
class RecordingAgent:
    """A real Agent (no kept-alive connections) that records every answer
    as (method, path?query, status, body length, Authorization)."""

    def __init__(self, on_response: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.log: list[tuple[str, str, int, int, str]] = []
        self.on_response = on_response
        self.refuse: Callable[[str, str], bool] = lambda method, target: False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Any = None,
        bodyProducer: Any = None,  # noqa: N803 - IAgent's name
    ) -> defer.Deferred[Any]:
        parts = urlsplit(uri.decode())
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if self.refuse(method.decode(), target):
            return defer.fail(ConnectionRefusedError("refused by the test"))
        length = bodyProducer.length if bodyProducer is not None else 0
        auth = (headers.getRawHeaders(b"authorization") or [b""])[0].decode()

        def seen(response: Any) -> Any:
            item = (method.decode(), target, response.code, length, auth)
            self.log.append(item)
            if self.on_response is not None:
                self.on_response(item)
            return response

        return self._agent.request(method, uri, headers, bodyProducer).addCallback(seen)

    def calls(self) -> list[tuple[str, str, int]]:
        return [(m, unquote(t), code) for m, t, code, _, _ in self.log]


def make_store(
    endpoint: str,
    pool: ThreadPool,
    prefix: str,
    agent: RecordingAgent | None = None,
    credentials: Any = ("testkey", "testsecret"),
    **config: Any,
) -> S3Store:
    creds = Credentials(*credentials) if isinstance(credentials, tuple) else credentials
    recording: Any = agent or RecordingAgent()  # an IAgent; zope interfaces do not type-check
    return S3Store(
        "traps",
        prefix,
        reactor,
        pool,
        StoreConfig(endpoint=endpoint, **config),
        credentials=creds,
        agent=recording,
    )


def bundle_file(directory: Path, size: int, seed: int) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = directory / f"bundle-{seed}.part"
    path.write_bytes(data)
    return path, data


def manifest_for(key: str, data: bytes) -> bytes:
    return testing.manifest_for(key, data).to_json_bytes()
