"""DATA over the memory budget goes to a spill file, and comes out of it
exactly as the in-memory path would have delivered it (StringTransport,
a manual runner for the spill writes, no sockets)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import address, defer
from twisted.internet.testing import StringTransport

from spamtrap.config import Config
from spamtrap.intake import spill as spill_mod
from spamtrap.intake.spill import SpillDir
from tests.support.smtp_helpers import Harness, trap_config


def _sync(f: Any, *args: Any) -> defer.Deferred[Any]:
    # The thread pool's place in unit tests: the same files, written at once.
    return defer.maybeDeferred(f, *args)


def _config(budget: int = 64 << 20, threshold: int = 1 << 20, size: int = 8 << 20) -> Config:
    return trap_config(
        smtp__data_memory_budget=budget,
        smtp__data_spill_threshold=threshold,
        smtp__max_message_size=size,
    )


def _harness(cfg: Config, spills: SpillDir | None, **kw: Any) -> Harness:
    h = Harness(cfg, **kw)
    h.factory.spill = spills
    return h


class _ManualRunner:
    """Runs each job only when the test says so (a slow disk)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            try:
                result = f(*args)
            except Exception as e:  # noqa: BLE001 - handed to the Deferred
                d.errback(e)
            else:
                d.callback(result)


_pieces = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b".",
        b"..",
        b"\r\n.",
        b"\n.",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"x",
        b"From ",
        b"\x00",
        b"\xff",
    ]
)


_bodies = st.lists(st.one_of(_pieces, st.binary(max_size=40)), max_size=60).map(b"".join)


def _run(
    spills: SpillDir | None, body: bytes, cuts: list[int], crlf: bool, size: int
) -> tuple[list[bytes], list[bytes], str]:
    h = _harness(_config(budget=1 << 20, threshold=0, size=size), spills)
    end = b"\r\n" if crlf else b"\n"
    h.send(b"EHLO x" + end + b"MAIL FROM:<a@b>" + end + b"RCPT TO:<v@trap.example>" + end)
    h.send(b"DATA" + end)
    stream = body + end + b"." + end + b"NOOP" + end
    at = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        if c > at:
            h.send(stream[at:c])
            at = c
    # Queue ids differ from run to run; everything else must not.
    replies = [r.split(b" queued as ")[0] for r in h.replies()]
    return replies, [e.data for e in h.submitted], h.proto.dialect.render()


@settings(max_examples=300, deadline=None)
@given(
    body=_bodies,
    cuts=st.lists(st.integers(min_value=0, max_value=2500), max_size=12),
    crlf=st.booleans(),
    size=st.sampled_from([40, 200, 100_000]),
)
def test_spilled_data_is_delivered_exactly_as_in_memory(
    body: bytes, cuts: list[int], crlf: bool, size: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        spills = SpillDir(d, run=_sync)
        spills.clean()
        spilled = _run(spills, body, cuts, crlf, size)
        assert os.listdir(d) == []  # read back and removed (or never kept)
        assert spills.open_spills == 0 and spills.reading == 0
    assert spilled == _run(None, body, cuts, crlf, size)


def _open_data(h: Harness) -> None:
    h.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")


def _second_session(h: Harness, peer: str = "192.0.2.8") -> tuple[Any, StringTransport]:
    p = h.factory.buildProtocol(None)
    t = StringTransport(peerAddress=address.IPv4Address("TCP", peer, 1))
    p.makeConnection(t)
    return p, t


def test_a_session_over_the_threshold_keeps_only_a_few_bytes(tmp_path: Path) -> None:
    spills = SpillDir(str(tmp_path), run=_sync)
    h = _harness(_config(threshold=256 << 10), spills)
    _open_data(h)
    line = b"y" * 998 + b"\r\n"
    h.send(line * 200)  # 200 KB: in memory
    assert spills.open_spills == 0 and h.factory.data_in_memory > 200_000
    h.send(line * 100)  # past 256 KiB: spilled
    assert spills.open_spills == 1
    assert len(h.proto._data) <= spill_mod.CONTEXT
    assert h.factory.data_in_memory <= spill_mod.CONTEXT
    (f,) = os.listdir(tmp_path)
    assert os.path.getsize(tmp_path / f) == 300 * len(line) - spill_mod.CONTEXT
    h.send(b".\r\n")
    assert h.submitted[0].data == line * 300
    assert os.listdir(tmp_path) == [] and h.factory.data_in_memory == 0


def test_the_budget_is_shared_by_all_sessions(tmp_path: Path) -> None:
    spills = SpillDir(str(tmp_path), run=_sync)
    h = _harness(_config(budget=1 << 20, threshold=1 << 20), spills)
    _open_data(h)
    chunk = (b"z" * 78 + b"\r\n") * 8000  # 640 KB
    h.send(chunk)
    assert spills.open_spills == 0
    p2, t2 = _second_session(h)
    p2.dataReceived(b"EHLO y\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    p2.dataReceived(chunk)  # 1.28 MB in all: this one goes to disk
    assert spills.open_spills == 1 and p2._spill is not None and h.proto._spill is None
    assert h.factory.data_in_memory <= len(chunk) + 2 + spill_mod.CONTEXT
    p2.dataReceived(b".\r\n")
    h.send(b".\r\n")
    assert b"250 2.0.0 Ok: queued" in t2.value()
    assert [e.data for e in h.submitted] == [chunk, chunk]
    assert h.factory.data_in_memory == 0


def test_a_closed_session_leaves_no_spill_file(tmp_path: Path) -> None:
    spills = SpillDir(str(tmp_path), run=_sync)
    h = _harness(_config(budget=1 << 20, threshold=0), spills)
    _open_data(h)
    h.send(b"a" * 100_000)
    assert len(os.listdir(tmp_path)) == 1
    h.proto.connectionLost(None)
    assert os.listdir(tmp_path) == [] and spills.open_spills == 0
    assert h.factory.data_in_memory == 0


def test_too_large_spilled_data_gets_552_and_no_file(tmp_path: Path) -> None:
    spills = SpillDir(str(tmp_path), run=_sync)
    h = _harness(_config(threshold=0, size=100_000), spills)
    _open_data(h)
    h.replies()
    for _ in range(30):
        h.send(b"b" * 9_998 + b"\r\n")
    assert os.listdir(tmp_path) == []
    h.send(b".\r\nNOOP\r\n")
    assert h.codes() == [552, 250]
    assert h.submitted == []


def test_a_slow_disk_pauses_the_peer_and_the_250_waits_for_the_file(tmp_path: Path) -> None:
    runner = _ManualRunner()
    spills = SpillDir(str(tmp_path), run=runner)
    h = _harness(_config(threshold=0), spills)
    _open_data(h)
    h.replies()
    block = b"c" * 99_998 + b"\r\n"
    for _ in range(8):
        h.send(block)
    assert h.transport.producerState == "paused"  # 800 KB waiting for the disk
    runner.run_all()
    assert h.transport.producerState == "producing"
    h.send(b".\r\n")
    assert h.codes() == [] and h.submitted == []  # still being read back
    runner.run_all()
    assert h.codes() == [250]
    assert h.submitted[0].data == block * 8


def test_a_spill_write_error_answers_451(tmp_path: Path) -> None:
    def failing(f: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.fail(OSError(28, "No space left on device"))

    h = _harness(_config(threshold=0), SpillDir(str(tmp_path), run=failing))
    _open_data(h)
    h.replies()
    h.send(b"d" * 1000 + b"\r\n")
    h.send(b".\r\nNOOP\r\n")
    assert h.codes() == [451, 250]
    assert h.submitted == []


def test_read_backs_share_the_budget_and_one_always_runs() -> None:
    spills = SpillDir("unused", run=_sync)
    order: list[str] = []
    spills.reserve(600, 1000).addCallback(lambda _: order.append("a"))
    spills.reserve(600, 1000).addCallback(lambda _: order.append("b"))
    spills.reserve(5000, 1000).addCallback(lambda _: order.append("c"))
    assert order == ["a"]
    spills.unreserve(600)
    assert order == ["a", "b"]
    spills.unreserve(600)
    assert order == ["a", "b", "c"]  # larger than the budget, alone: it runs


def test_clean_removes_what_a_previous_process_left(tmp_path: Path) -> None:
    d = tmp_path / "spill" / "node"
    d.mkdir(parents=True)
    (d / "123-0.spill").write_bytes(b"never acknowledged")
    (d / "keep.txt").write_bytes(b"not ours")
    assert SpillDir(str(d), run=_sync).clean() == 1
    assert os.listdir(d) == ["keep.txt"]


@pytest.mark.parametrize("crlf", [True, False])
def test_unstuffing_across_piece_boundaries(tmp_path: Path, crlf: bool) -> None:
    eol = b"\r\n" if crlf else b"\n"
    raw = b"\r\n" + b"..a" + eol + b".." + eol + b"." + eol[:1]
    spills = SpillDir(str(tmp_path), run=_sync)
    for cut in range(1, len(raw)):
        s = spills.open(eol, skip=2)
        s.feed(raw[:cut])
        s.feed(raw[cut:])
        got = defer.ensureDeferred(s.content(1 << 20))
        expected = raw.replace(eol + b".", eol)[2:]
        assert got.result == expected, cut
