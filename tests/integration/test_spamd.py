"""The spamd stage over real sockets: a fake spamd on loopback, a real
spamd, and the agreement between spamd's ANY_BOUNCE_MESSAGE and the native
detector."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from spamtrap import testing
from spamtrap.config import default_config
from spamtrap.filters import Discard, Keep
from spamtrap.filters.bounce import classify
from spamtrap.filters.spamd import (
    SpamdClient,
    SpamdStage,
    make,
)
from spamtrap.message import Envelope
from tests.support.corpus import envelope_sender, load_message, require_bounces, require_corpus
from tests.support.spamd_server import SpamdServer, spamd_server  # noqa: F401 - a fixture

reactor: Any = _reactor  # typed Any: mypy without the zope plugin


def env(data: bytes = b"Subject: hi\r\n\r\nhi\r\n") -> Envelope:
    return Envelope("m1", 0.0, "", ["trap@trap.example"], data)


# -- the reply parser ------------------------------------------------------------


# -- the protocol over a StringTransport -------------------------------------------


# -- the client: concurrency and timeout, on a Clock -------------------------------


# -- the stage: verdicts and the error policy ---------------------------------------


# -- the whole path on the real reactor, against a fake spamd on loopback -------------


class FakeSpamd(protocol.Protocol):
    """Reads one SYMBOLS request; answers bounce symbols if the body says
    "bounce", stays silent if it says "stall"."""

    transport: Any

    def __init__(self) -> None:
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        assert head.startswith(b"SYMBOLS SPAMC/1.5\r\n")
        length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
        if len(body) < length:
            return
        if b"stall" in body:
            return
        symbols = b"ANY_BOUNCE_MESSAGE,BOUNCE_MESSAGE" if b"bounce" in body else b"HTML_MESSAGE"
        self.transport.write(
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; 0.1 / 5.0\r\n\r\n%s"
            % (len(symbols), symbols)
        )
        self.transport.loseConnection()


@pytest.fixture
def fake_spamd() -> Iterator[int]:
    factory = protocol.Factory.forProtocol(FakeSpamd)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def real_stage(port: int, timeout: float = 10, on_error: str = "keep") -> SpamdStage:
    cfg = testing.config(
        default_config(),
        filters__spamd__enabled=True,
        filters__spamd__port=port,
        filters__spamd__timeout=timeout,
        filters__spamd__on_error=on_error,
    )
    stage = make(cfg, reactor)
    assert stage is not None
    return stage


@pytest_twisted.ensureDeferred
async def test_stage_in_a_thread_against_a_fake_spamd(fake_spamd: int) -> None:
    stage = real_stage(fake_spamd)
    bounce = await threads.deferToThread(stage, env(b"Subject: x\r\n\r\na bounce\r\n"))
    plain = await threads.deferToThread(stage, env(b"Subject: x\r\n\r\nhello\r\n"))
    assert bounce == Discard("spamd:ANY_BOUNCE_MESSAGE")
    assert plain is None
    assert stage.errors == 0


@pytest_twisted.ensureDeferred
async def test_stage_times_out_against_a_stalled_spamd(fake_spamd: int) -> None:
    stage = real_stage(fake_spamd, timeout=0.3, on_error="discard")
    verdict = await threads.deferToThread(stage, env(b"Subject: x\r\n\r\nstall\r\n"))
    assert verdict == Discard("spamd-error")
    assert stage.errors == 1


@pytest_twisted.ensureDeferred
async def test_stage_when_spamd_is_down() -> None:
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()  # nothing listens there now
    stage = real_stage(number)
    assert await threads.deferToThread(stage, env()) == Keep("spamd-error")
    assert stage.errors == 1


# -- a real spamd -----------------------------------------------------------------


def _client(server: SpamdServer) -> SpamdClient:
    endpoint = TCP4ClientEndpoint(reactor, server.host, server.port, timeout=60)
    return SpamdClient(endpoint, reactor, timeout=120, max_concurrency=3)


@pytest.mark.slow
@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_real_spamd_discards_a_bounce(spamd_server: SpamdServer) -> None:  # noqa: F811
    stage = real_stage(spamd_server.port, timeout=60)
    bounce = load_message(next(p for p in require_bounces() if p.name == "lhost-postfix-01.eml"))
    spam = load_message(require_corpus("spam-2")[0])
    assert await threads.deferToThread(stage, env(bounce)) == Discard("spamd:ANY_BOUNCE_MESSAGE")
    assert await threads.deferToThread(stage, env(spam)) is None
    assert stage.errors == 0


# Bounces spamd catches and the native detector misses, on purpose: none.
NATIVE_MISSES_OK: set[str] = set()


async def _both(client: SpamdClient, paths: list[Path]) -> dict[str, tuple[bool, bool, str]]:
    """name -> (spamd says bounce, native says bounce, native reason)."""
    datas = [load_message(p) for p in paths]
    # The client's timeout counts time queued for a slot: ask in waves of
    # its concurrency, so a slow (loaded) machine cannot time out the tail.
    replies: list[Any] = []
    for i in range(0, len(datas), 3):
        replies += await defer.gatherResults(
            [client.symbols(d) for d in datas[i : i + 3]], consumeErrors=True
        )
    out = {}
    for path, data, reply in zip(paths, datas, replies, strict=True):
        reason = classify(data, envelope_sender(data)) or ""
        out[path.name] = ("ANY_BOUNCE_MESSAGE" in reply.symbols, bool(reason), reason)
    return out


def _table(name: str, results: dict[str, tuple[bool, bool, str]]) -> dict[str, list[str]]:
    cells: dict[str, list[str]] = {"both": [], "spamd only": [], "native only": [], "neither": []}
    for file, (sa, native, reason) in sorted(results.items()):
        key = {(True, True): "both", (True, False): "spamd only",
               (False, True): "native only", (False, False): "neither"}[(sa, native)]
        cells[key].append(f"{file} ({reason})" if reason else file)
    n = len(results)
    print(f"\n{name}: {n} messages; spamd flags {len(cells['both']) + len(cells['spamd only'])},"
          f" native flags {len(cells['both']) + len(cells['native only'])}")
    for key, files in cells.items():
        print(f"  {key:12} {len(files):5}")
    for key in ("spamd only", "native only"):
        for file in cells[key]:
            print(f"    {key}: {file}")
    return cells


@pytest.mark.slow
@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_agreement_with_spamassassin(spamd_server: SpamdServer) -> None:  # noqa: F811
    """All bounces and all of spam-2 (about 90 s with 3 children)."""
    client = _client(spamd_server)
    bounces = _table("bounces", await _both(client, require_bounces()))
    spam = _table("spam-2", await _both(client, require_corpus("spam-2")))

    # The native detector catches every bounce spamd catches.
    assert {f.split(" ")[0] for f in bounces["spamd only"]} <= NATIVE_MISSES_OK
    n_bounces = sum(len(v) for v in bounces.values())
    spamd_caught = len(bounces["both"]) + len(bounces["spamd only"])
    native_caught = len(bounces["both"]) + len(bounces["native only"])
    # SpamAssassin 4.0.1 catches about 91% of them (docs/recipes.md).
    assert 0.85 * n_bounces <= spamd_caught <= native_caught
    assert native_caught >= 0.99 * n_bounces
    # On spam both flag a handful at most, and mostly the same ones.
    n_spam = sum(len(v) for v in spam.values())
    assert len(spam["both"]) + len(spam["spamd only"]) <= 0.005 * n_spam
    assert len(spam["both"]) + len(spam["native only"]) <= 0.002 * n_spam
    assert len(spam["both"]) >= 1  # spam-2 00169 is a real bounce
