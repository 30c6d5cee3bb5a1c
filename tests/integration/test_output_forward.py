"""Output ``type: forward`` through a real relay: a private Postfix on
loopback (Debian ``postfix``) that delivers the partners' mail to Maildirs,
each format parsed back from what was delivered; a relay that is down and
comes back, driven through the output's durable queue and runner; and tiny
servers on loopback that answer garbage, hang up or never answer.
"""

from __future__ import annotations

import email
import email.policy
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, ssl
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, globalLogPublisher

from spamtrap.config import RelayConfig, parse_config
from spamtrap.config.schema import SetConfig, TLSConfig
from spamtrap.intake import tls
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.outputs.base import (
    OutputContext,
    OutputItem,
    PermanentFailure,
    TemporaryFailure,
)
from spamtrap.outputs.forward import ForwardOutput, ForwardRelay, Settings, build
from spamtrap.outputs.queue import encode_item
from spamtrap.outputs.service import Outputs
from tests.support.arf import check_structure, feedback
from tests.support.node import free_port
from tests.support.notify import AuthRelay
from tests.support.partner import PARTNERS, Partner

reactor: Any = _reactor
SETS = {
    "all": SetConfig(name="all"),
    "shared": SetConfig(name="shared", redact_trap_addresses=True),
}


@pytest.fixture
def partner() -> Iterator[Partner]:
    p = Partner()
    p.mta.start()
    try:
        yield p
    finally:
        p.mta.cleanup()


def context(port: int) -> OutputContext:
    relay = RelayConfig(host="127.0.0.1", port=port, sender="trap@trap.test")
    return OutputContext(
        reactor=reactor,
        node="n1",
        data_dir="/nonexistent",
        relay=relay,
        hostname="trap.test",
        sets=SETS,
    )


_MADE: list[ForwardOutput] = []


@pytest.fixture(autouse=True)
def _close_outputs() -> Iterator[None]:
    """Every output a test made is closed (its mail-making thread stopped)."""
    yield
    while _MADE:
        _MADE.pop().close()


def output(port: int, fmt: str, **keys: Any) -> ForwardOutput:
    settings = Settings(
        name="partners",
        type="forward",
        sets=["all"],
        to=keys.pop("to", PARTNERS),
        format=fmt,
        **keys,
    )
    out = build("partners", settings, context(port))
    _MADE.append(out)
    return out


def envelope(n: int, data: bytes | None = None) -> Envelope:
    if data is None:
        data = (
            f"From: Shop <bot{n}@spam.example>\r\nTo: v@trap.example\r\n"
            f"Subject: offer {n}\r\nMessage-ID: <{n}@spam.example>\r\n\r\n"
            f".a line with a leading dot\r\nbuy now {n}\r\n"
        ).encode()
    meta = {
        "id": [f"18c.x{n}.n1"],
        "peer": ["203.0.113.9 40000"],
        "rcpt": ["<v@trap.example>"],
        "domain": ["trap.example"],
    }
    received = ["from bot ([203.0.113.9])", "by trap.test (spamtrap) with ESMTP id x"]
    received.append("for <v@trap.example>; Thu, 3 Dec 2026 10:00:00 +0000")
    return Envelope(
        f"18c.x{n}.n1",
        1_796_292_000.0,
        f"bot{n}@spam.example",
        ["v@trap.example"],
        data,
        meta=meta,
        received=received,
    )


def delivered_part(mail: bytes) -> bytes:
    """What we sent, from a delivered copy: Postfix put Return-Path,
    X-Original-To, Delivered-To and its Received line on top."""
    for name in (b"Return-Path:", b"X-Original-To:", b"Delivered-To:"):
        assert mail.startswith(name), mail[:200]
        mail = mail.split(b"\r\n", 1)[1]
    assert mail.startswith(b"Received: from ")
    end = mail.index(b"\r\n", mail.index(b"(Postfix)"))
    mail = mail[end + 2 :]
    while mail.startswith((b"\t", b" ")):  # the rest of Postfix's Received
        mail = mail.split(b"\r\n", 1)[1]
    return mail


def without_date(mail: bytes) -> list[bytes]:
    return [line for line in mail.split(b"\r\n") if not line.startswith(b"Date:")]


async def failure_of(d: Any) -> Exception:
    try:
        await d
    except Exception as e:  # noqa: BLE001 - returned for the test to look at
        return e
    raise AssertionError("expected a failure")


# -- each format, delivered by a real Postfix -------------------------------------------


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_attach_arrives_with_the_message_intact(partner: Partner) -> None:
    out = output(partner.port, "attach")
    env = envelope(1)
    it = OutputItem(env, "all")
    await out.send(it)
    boxes = await partner.wait(1)
    for address in PARTNERS:
        (mail,) = boxes[address]
        # What Postfix delivered is what we sent (but for the Date, made at the send).
        ours = out.mail(it, reactor.seconds(), eight_bit=True)
        assert without_date(delivered_part(mail)) == without_date(ours)
        msg = email.message_from_bytes(mail, policy=email.policy.compat32)
        assert msg["Delivered-To"] == address
        assert msg["Subject"] == "spamtrap all: offer 1"
        assert msg["X-Spamtrap-Id"] == "18c.x1.n1"
        text, attached = msg.get_payload()
        assert attached.get_content_type() == "message/rfc822"
        inner = attached.get_payload()[0]
        assert inner["X-Spamtrap-Id"] == "18c.x1.n1"
        assert inner["Message-ID"] == "<1@spam.example>"
        # The message as stored, byte for byte (dot-stuffing undone by Postfix).
        assert it.message() in mail


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_resend_arrives_as_the_message_with_resent_fields(partner: Partner) -> None:
    out = output(partner.port, "resend")
    it = OutputItem(envelope(2), "all")
    await out.send(it)
    boxes = await partner.wait(1)
    for address in PARTNERS:
        (mail,) = boxes[address]
        msg = email.message_from_bytes(mail, policy=email.policy.compat32)
        assert msg["Resent-From"] == "trap@trap.test"
        assert msg["Resent-To"].replace("\r\n", "").split(", ") == PARTNERS
        assert msg["Resent-Message-ID"] == "<18c.x2.n1.resend.partners@trap.test>"
        assert msg["Message-ID"] == "<2@spam.example>"  # the original's own
        assert msg["Return-Path"] == "<trap@trap.test>"
        assert delivered_part(mail).endswith(it.message())


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_arf_arrives_as_an_rfc5965_report(partner: Partner) -> None:
    out = output(partner.port, "arf")
    kept = OutputItem(envelope(3), "all")
    redacted = OutputItem(envelope(4), "shared")
    await out.send(kept)
    await out.send(redacted)
    boxes = await partner.wait(2)
    for address in PARTNERS:
        by_id = {}
        for mail in boxes[address]:
            msg = check_structure(mail, received_at=1_796_292_000.0)
            by_id[msg["X-Spamtrap-Id"]] = mail
        fields = dict(feedback(by_id["18c.x3.n1"]))
        assert fields["Source-IP"] == "203.0.113.9"
        assert fields["Original-Mail-From"] == "<bot3@spam.example>"
        assert fields["Original-Rcpt-To"] == "<v@trap.example>"
        assert fields["Reported-Domain"] == "spam.example"
        assert fields["Arrival-Date"] == "Thu, 03 Dec 2026 10:00:00 GMT"
        # A set that redacts: the report does not name the trap.
        assert "Original-Rcpt-To" not in dict(feedback(by_id["18c.x4.n1"]))
        inner = email.message_from_bytes(by_id["18c.x3.n1"]).get_payload()[2].get_payload()[0]
        assert inner["Subject"] == "offer 3"


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_8bit_goes_through_postfix_as_8bitmime(partner: Partner) -> None:
    data = (
        "From: bot@spam.example\r\nSubject: caf\u00e9\r\n\r\nna\u00efve \u00e9t\u00e9\r\n".encode()
    )
    it = OutputItem(envelope(5, data), "all")
    await output(partner.port, "attach").send(it)
    boxes = await partner.wait(1)
    mail = boxes[PARTNERS[0]][0]
    assert it.message() in mail  # 8-bit bytes as they were: no conversion on the way
    attached = email.message_from_bytes(mail).get_payload()[1]
    assert attached["Content-Transfer-Encoding"] == "8bit"


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_a_partner_postfix_does_not_know_is_a_permanent_5xx(partner: Partner) -> None:
    out = output(partner.port, "attach", to=["nobody@partner.test"])
    e = await failure_of(out.send(OutputItem(envelope(6), "all")))
    assert isinstance(e, PermanentFailure) and e.reason == "5xx", e
    assert "550" in e.detail and "nobody@partner.test" in e.detail


# -- down, then back: the durable queue and its runner ----------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until(condition: Callable[[], bool], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        await deferLater(reactor, 0.05, lambda: None)


@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_forwards_queued_while_the_relay_is_down_arrive_once_it_is_back(
    tmp_path: Path,
) -> None:
    partner = Partner(port=free_port())  # not started: the relay is down
    cfg = parse_config(
        f"""\
data_dir: {tmp_path / "data"}
node: n1
traps: {{catch_all: true}}
smtp: {{hostname: trap.test}}
sets:
  all: {{}}
relay: {{host: 127.0.0.1, port: {partner.port}, sender: trap@trap.test}}
outputs:
  partners:
    type: forward
    sets: [all]
    to: [{", ".join(PARTNERS)}]
    format: arf
    retry_initial: 200ms
    retry_max: 1s
"""
    )
    metrics = Metrics()
    outputs = Outputs(cfg, metrics, reactor)
    outputs.startService()
    try:
        envs = [envelope(n) for n in range(10, 16)]
        records = [encode_item("all", env) for env in envs]
        await outputs.enqueue([("partners", r, zlib.crc32(r)) for r in records])
        failed = "spamtrap_output_failed_total"
        await until(lambda: sample(metrics, failed, output="partners", reason="refused") >= 3)
        assert sample(metrics, "spamtrap_output_sent_total", output="partners") == 0
        assert "partners" in outputs.failing()
        partner.mta.start()
        await until(lambda: sample(metrics, "spamtrap_output_sent_total", output="partners") == 6)
        boxes = await partner.wait(6)
        for address in PARTNERS:
            ids = sorted(email.message_from_bytes(m)["X-Spamtrap-Id"] for m in boxes[address])
            assert ids == sorted(env.msg_id for env in envs)
        assert outputs.failing() == {}
        assert sample(metrics, "spamtrap_output_queue_depth", output="partners") == 0
    finally:
        await outputs.stopService()
        partner.mta.cleanup()


# -- relays that are not relays -----------------------------------------------------------


class Garbage(protocol.Protocol):
    """Answers with ``script``: each item is sent after a line from us
    (the first at once); ``None`` hangs up, and the script's end goes silent."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = list(script)

    def connectionMade(self) -> None:
        self.next()

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\n")):
            self.next()

    def next(self) -> None:
        if not self.script:
            return
        step = self.script.pop(0)
        if step is None:
            self.transport.loseConnection()
        else:
            self.transport.write(step)


GARBAGE = {
    "junk": ([b"\x00\xff\xfe garbage \x80\r\n"], "garbage"),
    "http": ([b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"], "garbage"),
    "no-line-end": ([b"2" * 70000], "garbage"),
    "odd-code": ([b"220 hi\r\n", b"777 huh\r\n"], "garbage"),
    "hang-up": ([None], "disconnected"),
    "hang-up-mid-data": (
        [b"220 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]
        + [None],
        "disconnected",
    ),
    "silent": ([], "timeout"),
    "silent-after-data": (
        [b"220 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"],
        "timeout",
    ),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
@pytest_twisted.ensureDeferred
async def test_a_relay_answering_garbage_is_retried_and_crashes_nothing(name: str) -> None:
    script, reason = GARBAGE[name]
    factory = protocol.Factory.forProtocol(lambda: Garbage(script))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    errors: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("isError") or event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        out = output(port.getHost().port, "arf", timeout=1.0)
        e = await failure_of(out.send(OutputItem(envelope(7), "all")))
        assert isinstance(e, TemporaryFailure) and e.reason == reason, e
        # Let the connection's end play out, then look for unhandled errors.
        await deferLater(reactor, 0.2, lambda: None)
        assert errors == []
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_closed_port_is_refused() -> None:
    out = output(free_port(), "attach", timeout=5.0)
    e = await failure_of(out.send(OutputItem(envelope(8), "all")))
    assert isinstance(e, TemporaryFailure) and e.reason == "refused", e


# -- the output's own relay: STARTTLS and AUTH ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_its_own_relay_over_starttls_with_auth(tmp_path: Path) -> None:
    ctx = tls.context_factory(TLSConfig(), str(tmp_path), "localhost")
    root = ssl.Certificate.loadPEM((tmp_path / "tls" / "selfsigned.pem").read_bytes())
    relay = AuthRelay(ctx, b"forwarder", b"s3cret")
    port = reactor.listenTCP(0, relay, interface="127.0.0.1")

    def own(password: str) -> ForwardOutput:
        keys = {"host": "localhost", "port": port.getHost().port, "starttls": True}
        out = output(
            1,  # the top-level relay's port: not used
            "resend",
            relay=ForwardRelay(**keys, username="forwarder", password=password),
            sender="reports@trap.test",
        )
        return out

    try:
        out = own("s3cret")
        out.client_tls = lambda host: ssl.optionsForClientTLS("localhost", trustRoot=root)
        await out.send(OutputItem(envelope(9), "all"))
        assert relay.logins == [b"forwarder"]
        first, second = relay.messages  # one for each partner
        message = first
        assert second == first
        assert b"Resent-From: reports@trap.test" in message
        assert b"X-Spamtrap-Id: 18c.x9.n1" in message
        # A wrong password: temporary (the operator fixes it, the queue waits).
        wrong = own("Wr0ng")
        wrong.client_tls = out.client_tls
        e = await failure_of(wrong.send(OutputItem(envelope(10), "all")))
        assert isinstance(e, TemporaryFailure) and e.reason == "auth", e
        assert "Wr0ng" not in str(e)
        # By default the certificate must chain to the system's roots.
        untrusted = own("s3cret")
        e = await failure_of(untrusted.send(OutputItem(envelope(11), "all")))
        assert isinstance(e, TemporaryFailure) and e.reason == "tls", e
        assert "certificate verify failed" in e.detail
        assert len(relay.messages) == 2
    finally:
        await port.stopListening()
