"""Output ``type: pyzor`` against a real pyzord (Debian ``pyzor``, gdbm
engine) on loopback, through the real reactor: what it reports, the real
``pyzor check`` counts; its digests are the ``pyzor digest`` CLI's; signed
accounts; a server that is down, one that is blackholed and one that
answers garbage; and the whole way from the output's durable queue through
its runner, with the server down at first.
"""

from __future__ import annotations

import email
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from spamtrap.config import RelayConfig, parse_config
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.outputs import _pyzor_wire as wire
from spamtrap.outputs.base import OutputContext, OutputItem, TemporaryFailure
from spamtrap.outputs.pyzor import PyzorOutput, Settings, build
from spamtrap.outputs.queue import encode_item
from spamtrap.outputs.service import Outputs
from tests.support.corpus import load_message, require_corpus
from tests.support.pyzord import PyzordServer, free_udp_port, pyzord, spam  # noqa: F401 - fixture

pytestmark = pytest.mark.needs_debian
reactor: Any = _reactor

SALT = "227bfb58efaba7c582d9dcb66ab2063d38df2923"
KEY = "8da9f54058c34e383e997f45d6eb74837139f83b"


def item(data: bytes, msg_id: str) -> OutputItem:
    return OutputItem(
        Envelope(msg_id, time.time(), "bot@spam.example", ["t@trap.example"], data), "all"
    )


def context(tmp_path: Path) -> OutputContext:
    return OutputContext(
        reactor=reactor,
        node="n1",
        data_dir=str(tmp_path),
        relay=RelayConfig(),
        hostname="trap.test",
    )


def settings(servers: list[str], **keys: Any) -> Settings:
    return Settings(name="report", type="pyzor", sets=["all"], servers=servers, **keys)


async def failure_of(d: Any) -> Exception:
    try:
        await d
    except Exception as e:  # noqa: BLE001 - returned for the test to look at
        return e
    raise AssertionError("expected a failure")


async def close(out: PyzorOutput) -> None:
    d = out.close()
    if d is not None:
        await d


class Silent(DatagramProtocol):
    """A blackholed server: takes every datagram, answers none."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append(datagram)


class Garbage(DatagramProtocol):
    """A server that answers every request with junk (and, once ``honest``,
    with junk and then the real reply)."""

    JUNK = (
        b"\x00\xff\xfe garbage",
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"Code: 200\nDiag: OK\nPV: 2.1\n\n",  # no Thread
        b"Code: OK\nDiag: OK\nPV: 2.1\nThread: %d\n\n",
        b"Code: 200\nDiag: OK\nPV: 2.1\nThread: 7\n\n",  # somebody else's
        b"X" * 8000,
    )

    def __init__(self) -> None:
        self.honest = False
        self.answered = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        transport: Any = self.transport
        thread = int(email.message_from_bytes(datagram)["Thread"])
        for junk in self.JUNK:
            transport.write(junk.replace(b"%d", str(thread).encode()), addr)
        if self.honest:
            self.answered += 1
            reply = f"Code: 200\nDiag: OK\nPV: 2.1\nThread: {thread}\n\n".encode()
            transport.write(reply, addr)


# -- reports that pyzor check counts ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reports_are_counted_by_pyzor_check(pyzord: PyzordServer, tmp_path: Path) -> None:  # noqa: F811
    messages = [spam(n) for n in range(25)]
    out = build("report", settings([pyzord.address], timeout=5.0), context(tmp_path))
    try:
        # All at once, as the runner's concurrency may have them: replies
        # are matched by thread id, digests run in the output's threads.
        digests = await gatherResults([out.send(item(m, f"id{n}")) for n, m in enumerate(messages)])
        assert digests == [wire.digest(m) for m in messages]
        assert len(set(digests)) == len(messages)
        assert pyzord.check(messages) == [(1, 0)] * len(messages)
        # A second report of some (other messages, same bodies) counts again.
        for n in range(5):
            await out.send(item(messages[n], f"again{n}"))
        assert pyzord.check(messages) == [(2, 0)] * 5 + [(1, 0)] * 20
        assert pyzord.usage() == [("anonymous", 200)] * 30
    finally:
        await close(out)


@pytest_twisted.ensureDeferred
async def test_digests_are_what_the_pyzor_cli_computes(pyzord: PyzordServer) -> None:  # noqa: F811
    corpus = [load_message(p) for p in require_corpus("spam-2")[:40]]
    for raw in [spam(n) for n in range(5)] + corpus:
        cli = pyzord.digest(raw)
        try:
            ours = wire.digest(raw)
        except AttributeError:
            # Pyzor's digester fails on some HTML; so does its CLI.
            assert cli == "", cli
            continue
        assert ours == cli


@pytest_twisted.ensureDeferred
async def test_signed_reports_for_a_named_account(tmp_path: Path) -> None:
    server = PyzordServer(tmp_path / "pyzord").start(accounts={"bob": KEY})
    good = build(
        "report", settings([server.address], user="bob", key=f"{SALT},{KEY}"), context(tmp_path)
    )
    wrong = build(
        "report", settings([server.address], user="bob", key="00" + KEY[2:]), context(tmp_path)
    )
    stranger = build("report", settings([server.address], user="eve", key=KEY), context(tmp_path))
    try:
        await good.send(item(spam(1), "a"))
        e = await failure_of(wrong.send(item(spam(2), "b")))
        assert isinstance(e, TemporaryFailure) and e.reason == "unauthorized", e
        e = await failure_of(stranger.send(item(spam(3), "c")))
        assert isinstance(e, TemporaryFailure) and e.reason == "unauthorized", e
        assert server.usage() == [("bob", 200)]
        assert server.check([spam(1), spam(2), spam(3)]) == [(1, 0), (0, 0), (0, 0)]
    finally:
        for out in (good, wrong, stranger):
            await close(out)
        server.stop()


# -- servers that are down, blackholed or answer garbage --------------------------------


@pytest_twisted.ensureDeferred
async def test_server_down_is_refused_then_the_retry_is_counted(tmp_path: Path) -> None:
    port = free_udp_port("127.0.0.1")
    out = build("report", settings([f"127.0.0.1:{port}"], timeout=5.0), context(tmp_path))
    server = PyzordServer(tmp_path / "pyzord", port=port)
    try:
        started = time.monotonic()
        e = await failure_of(out.send(item(spam(1), "a")))
        # Loopback answers ICMP port unreachable: no need to wait the timeout.
        assert isinstance(e, TemporaryFailure) and e.reason == "refused", e
        assert time.monotonic() - started < 4
        server.start()
        await out.send(item(spam(1), "a"))  # the retry
        assert server.check([spam(1)]) == [(1, 0)]
    finally:
        await close(out)
        server.stop()


@pytest_twisted.ensureDeferred
async def test_blackholed_server_times_out(tmp_path: Path) -> None:
    silent = Silent()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    out = build("report", settings([address], timeout=0.5), context(tmp_path))
    try:
        started = time.monotonic()
        results = await gatherResults(
            [ensureDeferred(failure_of(out.send(item(spam(n), f"m{n}")))) for n in range(3)]
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(e, TemporaryFailure) and e.reason == "timeout" for e in results)
        assert 0.5 <= elapsed < 4, elapsed
        assert len(silent.received) == 3  # each was sent once, not retried here
    finally:
        await close(out)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_server_answering_garbage_never_crashes(tmp_path: Path) -> None:
    garbage = Garbage()
    port = reactor.listenUDP(0, garbage, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    out = build("report", settings([address], timeout=0.5), context(tmp_path))
    try:
        e = await failure_of(out.send(item(spam(1), "a")))
        assert isinstance(e, TemporaryFailure) and e.reason == "garbage", e
        garbage.honest = True  # junk first, then the reply: the reply counts
        assert await out.send(item(spam(1), "a")) == wire.digest(spam(1))
        assert garbage.answered == 1
    finally:
        await close(out)
        await port.stopListening()


# -- the whole way: durable queue, runner, retries -----------------------------------


async def until(condition: Callable[[], bool], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        await deferLater(reactor, 0.05, lambda: None)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_queued_reports_are_retried_until_the_server_answers(tmp_path: Path) -> None:
    silent = Silent()
    udp = reactor.listenUDP(0, silent, interface="127.0.0.1")
    port = udp.getHost().port
    cfg = parse_config(
        f"""\
data_dir: {tmp_path / "data"}
node: n1
traps: {{catch_all: true}}
sets:
  all: {{}}
outputs:
  report:
    type: pyzor
    sets: [all]
    servers: ["127.0.0.1:{port}"]
    timeout: 300ms
    retry_initial: 200ms
    retry_max: 500ms
    rate: 50
"""
    )
    metrics = Metrics()
    outputs = Outputs(cfg, metrics, reactor)
    server = PyzordServer(tmp_path / "pyzord", port=port)
    messages = [spam(n) for n in range(6)]
    outputs.startService()
    try:
        envelopes = [
            Envelope(f"id{n}", time.time(), "", ["t@trap.example"], m)
            for n, m in enumerate(messages)
        ]
        records = [encode_item("all", env) for env in envelopes]
        await outputs.enqueue([("report", r, zlib.crc32(r)) for r in records])
        failed = "spamtrap_output_failed_total"
        await until(lambda: sample(metrics, failed, output="report", reason="timeout") >= 2)
        assert sample(metrics, "spamtrap_output_sent_total", output="report") == 0
        await udp.stopListening()
        server.start()
        await until(lambda: sample(metrics, "spamtrap_output_sent_total", output="report") == 6)
        assert server.check(messages) == [(1, 0)] * 6
        assert outputs.failing() == {}
    finally:
        await outputs.stopService()
        server.stop()
