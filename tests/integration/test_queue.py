"""The Redis Streams work queue against a real redis-server (AOF on).

The Redis calls run in real threads and the real reactor; the queue's own
timers (probe, refresh, claim) run on a task.Clock the tests advance. Idle
times inside Redis are set with XCLAIM ... IDLE rather than waited for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from spamtrap.config import QueueConfig, SpoolConfig
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.queue import Forwarder, QueueIntake, QueueWriter
from spamtrap.work.queue_link import QueueLink, QueueUnavailableError, format_id, parse_id
from spamtrap.work.queue_source import ACK_DELAY, QueueSource
from spamtrap.work.spool import Spool
from tests.support.node import free_port
from tests.support.poll import until
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("redis_server")


def envelope(i: int) -> Envelope:
    return Envelope(
        msg_id=f"m{i}",
        received_at=1_700_000_000.0 + i,
        mail_from="bot@example.net",
        rcpts=["trap@example.org"],
        data=b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i),
        meta={"id": [f"m{i}"]},
    )


@pytest.fixture
def make_link(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    links: list[QueueLink] = []

    def make(**kw: Any) -> QueueLink:
        cfg = QueueConfig(url=redis_server.url, **{"timeout": 2.0, "claim_idle": 30.0, **kw})
        link = QueueLink(cfg, Metrics(), reactor, clock=task.Clock())
        links.append(link)
        return link

    yield make
    for link in links:
        if link.running:
            link.stop()


@defer.inlineCallbacks
def started(link: QueueLink) -> Any:
    link.start()
    yield link.first_answer()
    assert link.up


def fill(link: QueueLink, n: int) -> defer.Deferred[Any]:
    """Add messages 0..n-1 to the stream."""
    return QueueWriter(link, link.metrics).add_many([envelope(i).to_record() for i in range(n)])


def stream(server: RedisServer) -> list[Any]:
    return server.command("XRANGE", "spamtrap", "-", "+") or []


@pytest_twisted.inlineCallbacks
def test_writer_adds_records_and_trims_the_oldest(make_link: Any, redis_server: RedisServer) -> Any:  # noqa: F811
    link = make_link(maxlen=100, batch=50)
    yield started(link)
    writer = QueueWriter(link, link.metrics)
    records = [envelope(i).to_record() for i in range(1000)]
    yield defer.gatherResults([writer.add(r) for r in records])
    entries = stream(redis_server)
    # MAXLEN ~ trims whole macro nodes: about maxlen remain, the newest.
    assert 100 <= len(entries) < 1000
    assert entries[-1][1] == [b"r", records[-1]]
    shed = link.metrics.queue_shed._value.get()
    assert shed == 1000 - len(entries)
    assert int(redis_server.command("GET", "spamtrap:shed")) == shed
    assert link.metrics.queue_added._value.get() == 1000


@pytest_twisted.inlineCallbacks
def test_intake_falls_back_to_the_spool_and_forwards_later(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Any:
    link = make_link()
    yield started(link)
    metrics = link.metrics
    spool = Spool(str(tmp_path / "spool"), SpoolConfig(), metrics, reactor)
    spool.start()
    writer = QueueWriter(link, metrics)
    intake = QueueIntake(writer, spool, "spool", metrics)
    forwarder = Forwarder(spool, writer, metrics, reactor, reactor.getThreadPool())
    forwarder.start()
    try:
        yield intake.submit(envelope(0))
        assert len(stream(redis_server)) == 1

        redis_server.kill()
        # The first add finds Redis gone; it and every later one is spooled.
        yield defer.gatherResults([intake.submit(envelope(i)) for i in range(1, 6)])
        assert not link.up
        assert metrics.queue_unreachable.labels(action="spooled")._value.get() == 5
        assert metrics.queue_up._value.get() == 0

        redis_server.start()
        link.clock.advance(link.cfg.retry_interval)  # the probe
        yield link.wait_up()
        yield poll(lambda: metrics.queue_forwarded._value.get() == 5)
        bodies = sorted(Envelope.from_record(e[1][1]).data for e in stream(redis_server))
        assert bodies == sorted(envelope(i).data for i in range(6))
        yield poll(lambda: spool.depth == 0 and spool.in_flight == 0)
    finally:
        yield defer.ensureDeferred(forwarder.stop())
        yield spool.stop()


@pytest_twisted.inlineCallbacks
def test_tempfail_policy_refuses_while_redis_is_down(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Any:
    link = make_link(on_unreachable="tempfail")
    yield started(link)
    spool = Spool(str(tmp_path / "spool"), SpoolConfig(), link.metrics, reactor)
    intake = QueueIntake(QueueWriter(link, link.metrics), spool, "tempfail", link.metrics)
    redis_server.kill()
    for i in range(3):
        with pytest.raises(QueueUnavailableError):
            yield intake.submit(envelope(i))
    assert link.metrics.queue_unreachable.labels(action="tempfail")._value.get() == 3
    assert spool.depth == 0


@pytest_twisted.inlineCallbacks
def test_worker_reads_acks_and_deletes(make_link: Any, redis_server: RedisServer) -> Any:  # noqa: F811
    link = make_link(batch=10)
    yield started(link)
    yield fill(link, 25)
    source = QueueSource(link, "w1", link.metrics)
    source.start()
    try:
        first = yield source.get()
        yield poll(lambda: source.depth >= 9)
        batch = [first, *source.take(100)]
        # Read ahead is bounded by one batch: the rest stays for other workers.
        assert len(batch) <= 2 * link.cfg.batch
        records = source.read_entries(batch)
        # Arrival order is not promised (a forwarded backlog interleaves); nothing relies on it.
        bodies = {Envelope.from_record(r).data for r in records}  # type: ignore[arg-type]
        assert bodies <= {envelope(i).data for i in range(25)} and len(bodies) == len(batch)
        source.ack_keys(e.key for e in batch)
        assert link.metrics.queue_acked._value.get() == 0  # gathered first...
        link.clock.advance(ACK_DELAY)  # ...then sent in one round trip
        yield poll(lambda: link.metrics.queue_acked._value.get() == len(batch))
        remaining = 25 - len(batch)
        assert len(stream(redis_server)) == remaining
        pending = redis_server.command("XPENDING", "spamtrap", "spamtrap")
        assert pending[0] <= link.cfg.batch  # only what this worker read ahead
    finally:
        yield defer.ensureDeferred(source.stop())


@pytest_twisted.inlineCallbacks
def test_restarted_worker_reads_its_own_pending_first(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
) -> Any:
    link = make_link(batch=5)
    yield started(link)
    yield fill(link, 5)
    first = QueueSource(link, "w1", link.metrics)
    first.start()
    yield poll(lambda: first.depth == 5)
    yield defer.ensureDeferred(first.stop_reading())  # "dies" holding 5 unacked

    again = QueueSource(link, "w1", link.metrics)
    again.start()
    try:
        yield poll(lambda: again.depth == 5)
        assert link.metrics.queue_read.labels(how="own")._value.get() == 5
        assert [e.key for e in again.take(5)] == sorted(
            parse_id(e[0]) for e in stream(redis_server)
        )
    finally:
        yield defer.ensureDeferred(again.stop())


def set_idle(server: RedisServer, consumer: str, ids: list[bytes], ms: int) -> None:
    server.command("XCLAIM", "spamtrap", "spamtrap", consumer, 0, *ids, "IDLE", ms, "JUSTID")


@pytest_twisted.inlineCallbacks
def test_a_dead_workers_messages_are_taken_over_a_live_ones_are_not(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
) -> Any:
    link = make_link(batch=20)
    yield started(link)
    yield fill(link, 8)
    live = QueueSource(link, "live", link.metrics)
    live.start()
    yield poll(lambda: live.depth == 8)
    ids = [format_id(e.key) for e in live.take(8)]
    other_link = make_link(batch=20)
    yield started(other_link)
    other = QueueSource(other_link, "other", other_link.metrics)
    other.start()
    try:
        # The live worker's entries look old, but it refreshes them...
        set_idle(redis_server, "live", ids, 120_000)
        link.clock.advance(link.cfg.claim_idle / 3)
        yield poll(lambda: max_idle(redis_server) < 10_000)
        claimed = yield other._claim_idle()
        assert claimed is None and other.depth == 0
        # ...until it stops refreshing (dies): then they are taken over.
        yield defer.ensureDeferred(live.stop_reading())
        live._refresh.stop()  # type: ignore[union-attr]
        set_idle(redis_server, "live", ids, 120_000)
        other_link.clock.advance(other_link.cfg.claim_idle / 2)
        yield poll(lambda: other.depth == 8)
        assert other_link.metrics.queue_read.labels(how="claimed")._value.get() == 8
        owners = redis_server.command("XPENDING", "spamtrap", "spamtrap")[3]
        assert owners == [[b"other", b"8"]]
    finally:
        yield defer.ensureDeferred(other.stop())


def max_idle(server: RedisServer) -> int:
    rows = server.command("XPENDING", "spamtrap", "spamtrap", "-", "+", 100)
    return max(r[2] for r in rows)


@pytest_twisted.inlineCallbacks
def test_trimmed_pending_entries_are_dropped_not_delivered(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
) -> Any:
    link = make_link(batch=5)
    yield started(link)
    yield fill(link, 5)
    first = QueueSource(link, "w1", link.metrics)
    first.start()
    yield poll(lambda: first.depth == 5)
    yield defer.ensureDeferred(first.stop_reading())
    # Shed while pending (XTRIM to 0 removes them from the stream).
    redis_server.command("XTRIM", "spamtrap", "MAXLEN", 0)
    again = QueueSource(link, "w1", link.metrics)
    again.start()
    try:
        # Read as entries without fields: acked (dropped), never handed out.
        yield poll(lambda: again._ack_call is not None)
        link.clock.advance(ACK_DELAY)
        yield poll(lambda: redis_server.command("XPENDING", "spamtrap", "spamtrap")[0] == 0)
        assert again.depth == 0
        assert link.metrics.queue_read.labels(how="own")._value.get() == 0
    finally:
        yield defer.ensureDeferred(again.stop())


@pytest_twisted.inlineCallbacks
def test_group_is_made_again_when_redis_lost_its_data(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
) -> Any:
    link = make_link()
    yield started(link)
    source = QueueSource(link, "w1", link.metrics)
    source.start()
    try:
        redis_server.command("DEL", "spamtrap")  # stream and group gone
        yield QueueWriter(link, link.metrics).add(envelope(1).to_record())
        yield poll(lambda: source.depth == 1)
    finally:
        yield defer.ensureDeferred(source.stop())


@pytest_twisted.inlineCallbacks
def test_replicas_wait_for_a_real_replica(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Any:
    link = make_link(replicas=1, timeout=2.0)
    link.start()
    yield link.first_answer()
    assert not link.up  # no replica yet: adds would not be as durable as configured
    redis_server.command("CONFIG", "SET", "repl-diskless-sync-delay", 0)
    replica = RedisServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(redis_server.port))
    ).start()
    try:
        yield poll(
            lambda: replica.command("INFO", "replication").find(b"master_link_status:up") >= 0
        )
        link.clock.advance(link.cfg.retry_interval)
        yield link.wait_up()
        yield QueueWriter(link, link.metrics).add(envelope(1).to_record())
        assert len(replica.command("XRANGE", "spamtrap", "-", "+")) == 1
    finally:
        replica.stop()


def poll(check: Any, timeout: float = 10.0) -> Any:
    # The real reactor runs the Redis threads; this waits for their results:
    # a turn through the thread pool before each look.
    def turn() -> Any:
        return deferToThread(lambda: None)

    return defer.ensureDeferred(until(check, timeout, interval=0.02, before=turn))


def documented_acl() -> list[str]:
    text = (Path(__file__).parents[2] / "docs" / "scaling.md").read_text()
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("ACL SETUSER"))
    return line.replace(">PASSWORD", ">s3cret").split()


@pytest_twisted.inlineCallbacks
def test_the_documented_acl_user_is_enough(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Any:
    assert redis_server.command(*documented_acl()) == b"OK"
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret\n")
    link = make_link(username="spamtrap", password_file=str(secret), batch=4)
    yield started(link)
    yield fill(link, 6)
    source = QueueSource(link, "w1", link.metrics)
    source.start()
    try:
        yield poll(lambda: source.depth == 4)
        source.ack_keys(e.key for e in source.take(4))
        link.clock.advance(ACK_DELAY)
        yield poll(lambda: link.metrics.queue_acked._value.get() == 4)
        yield source._refresh_held()
        yield source._claim_idle()
        link.clock.advance(5.0)  # the stats poll
        yield poll(lambda: link.metrics.queue_length._value.get() == 2)
        errors = [s for s in link.metrics.queue_errors.collect()[0].samples if s.value]
        assert errors == []
    finally:
        yield defer.ensureDeferred(source.stop())


@pytest_twisted.inlineCallbacks
def test_a_wrong_password_counts_as_unreachable(
    make_link: Any,
    redis_server: RedisServer,  # noqa: F811
) -> Any:
    redis_server.command(*documented_acl())
    link = make_link(username="spamtrap", password="wrong")
    link.start()
    yield link.first_answer()
    assert not link.up and link.metrics.queue_up._value.get() == 0


def make_pki(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - Python 3.11 too

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn: str, key: Any, issuer: Any, issuer_key: Any, ca: bool = False) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    out: dict[str, str] = {}

    def write(label: str, cert: Any, key: Any) -> None:
        (directory / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{label}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out[label] = str(directory / f"{label}.pem")
        out[label + "_key"] = str(directory / f"{label}.key")

    directory.mkdir(parents=True, exist_ok=True)
    for prefix in ("", "other_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = issue(f"{prefix}test CA", ca_key, name(f"{prefix}test CA"), ca_key, ca=True)
        write(prefix + "ca", ca, ca_key)
        if not prefix:
            for label in ("server", "client"):
                key = ec.generate_private_key(ec.SECP256R1())
                write(label, issue(label, key, ca.subject, ca_key), key)
    return out


@pytest_twisted.inlineCallbacks
def test_rediss_with_a_ca_and_a_client_certificate(tmp_path: Path) -> Any:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        extra=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", pki["server"], "--tls-key-file", pki["server_key"],
            "--tls-ca-cert-file", pki["ca"], "--tls-auth-clients", "yes",
        ),
    ).start()  # fmt: skip
    links = []
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        good = QueueConfig(url=url, ca_file=pki["ca"], cert_file=pki["client"],
                           key_file=pki["client_key"], timeout=2.0)  # fmt: skip
        no_client_cert = QueueConfig(url=url, ca_file=pki["ca"], timeout=2.0)
        wrong_ca = QueueConfig(url=url, ca_file=pki["other_ca"], cert_file=pki["client"],
                               key_file=pki["client_key"], timeout=2.0)  # fmt: skip
        for cfg in (good, no_client_cert, wrong_ca):
            links.append(QueueLink(cfg, Metrics(), reactor, clock=task.Clock()))
            links[-1].start()
            yield links[-1].first_answer()
        assert [link.up for link in links] == [True, False, False]
        yield QueueWriter(links[0], links[0].metrics).add(envelope(1).to_record())
        assert len(server.command("XRANGE", "spamtrap", "-", "+")) == 1
    finally:
        for link in links:
            link.stop()
        server.stop()
