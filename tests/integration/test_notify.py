"""Notifications: list mail through a real loopback relay, webhooks to a real
loopback web server, retries on a Clock, privacy between sets, stop.

The network I/O is real (the default reactor, 127.0.0.1 only); backoff and
deadlines run on a task.Clock the tests advance.
"""

from __future__ import annotations

import base64
import email
import email.parser
import email.policy
import hashlib
import hmac
import json
import string
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import Counter
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol, ssl
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from spamtrap.bundle.manifest import Manifest, Published
from spamtrap.config import (
    Config,
    RelayConfig,
    SetConfig,
    SetNotifyConfig,
    TLSConfig,
    WebhookConfig,
)
from spamtrap.intake import tls
from spamtrap.intake.smtp import TrapSMTPFactory
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.notify import (
    GIVE_UP_AFTER,
    MAIL_RETRY_FIRST,
    STOP_DEADLINE,
    Notifier,
    listen_port,
    notice_urls,
)
from spamtrap.notify.mail import RelayConfigError, check_relay, notice
from spamtrap.notify.webhook import SIGNATURE_HEADER, signature
from tests.support.node import free_port

reactor: Any = _reactor
LOCAL = "127.0.0.1"


class NotifyMetrics(Metrics):
    """Metrics with the notifications counter, until metrics.py has it."""

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(self, "notifications"):
            self.notifications = Counter(
                "spamtrap_notifications",
                "Notices of stored bundles, by channel and outcome",
                ["channel", "outcome"],
                registry=self.registry,
            )

    def count(self, channel: str, outcome: str) -> float:
        labels = {"channel": channel, "outcome": outcome}
        return self.registry.get_sample_value("spamtrap_notifications_total", labels) or 0.0


def manifest(set_name: str = "all", **changes: Any) -> dict[str, Any]:
    key = f"{set_name}/2026-11-22T13:00:00.node1.4wHkcYIyIeNMVh2H{set_name}.mbox.gz"
    doc: dict[str, Any] = {
        "format": 1,
        "set": set_name,
        "key": key,
        "size": 123456,
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "messages": 1234,
        "first_received": "2026-11-22T13:00:00Z",
        "last_received": "2026-11-22T14:00:00Z",
        "node": "node1",
        "url": f"https://traps.example.org/bucket/{key}",
    }
    doc.update(changes)
    return doc


def as_published(doc: dict[str, Any]) -> Published:
    """What BundleSet hands over for a manifest() notice: the manifest and
    the store's URL."""
    stored = {k: v for k, v in doc.items() if k != "url"}
    return Published(Manifest.from_dict(stored), doc.get("url"))


def config(*sets: SetConfig, relay_port: int = 25, **relay: Any) -> Config:
    cfg = Config(node="node1")
    cfg.smtp.hostname = "node1.test"
    cfg.sets = list(sets)
    cfg.relay = RelayConfig(host=LOCAL, port=relay_port, sender="spamtrap@notify.test", **relay)
    return cfg


def mail_set(name: str, *addresses: str, private: bool = False) -> SetConfig:
    return SetConfig(name=name, private=private, notify=SetNotifyConfig(mail=list(addresses)))


def pending(clock: Clock) -> list[Any]:
    """The clock's delayed calls (typed loosely: zope interfaces do not type-check)."""
    return list(clock.getDelayedCalls())


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the real reactor run until ``condition()`` holds (real I/O only)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.005, lambda: None)


# -- a real SMTP server: spamtrap's own, catching everything -----------------


class MailTrap:
    def __init__(self, tls_context: Any = None) -> None:
        cfg = Config(node="relay")
        cfg.smtp.hostname = "relay.test"
        cfg.traps.catch_all = True
        self.received: list[Envelope] = []
        self.factory = TrapSMTPFactory(
            cfg, self._submit, Metrics(), reactor, tls_context=tls_context
        )
        self.port: Any = None

    def _submit(self, env: Envelope) -> Deferred[None]:
        self.received.append(env)
        return succeed(None)

    async def listen(self, port: int = 0) -> int:
        ep = serverFromString(reactor, f"tcp:{port}:interface={LOCAL}")
        self.port = await ep.listen(self.factory)
        return int(self.port.getHost().port)

    async def close(self) -> None:
        await self.factory.shutdown()
        await self.port.stopListening()

    def mail_to(self, address: str) -> list[email.message.Message]:
        return [
            email.message_from_bytes(e.data, policy=email.policy.compat32)
            for e in self.received
            if e.rcpts == [address]
        ]


@pytest_twisted.async_yield_fixture
async def mailtrap() -> Any:
    trap = MailTrap()
    await trap.listen()
    yield trap
    await trap.close()


def body_fields(msg: email.message.Message) -> dict[str, str]:
    payload = msg.get_payload()
    assert isinstance(payload, str)
    return dict(email.parser.HeaderParser().parsestr(payload).items())


# -- mail ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mail_reaches_a_real_smtp_server_with_every_field(mailtrap: MailTrap) -> None:
    metrics = NotifyMetrics()
    cfg = config(
        mail_set("all", "all-list@lists.test", "second@lists.test"),
        relay_port=mailtrap.port.getHost().port,
    )
    n = Notifier(cfg, metrics, reactor, Clock())
    doc = manifest()
    n.published(as_published(doc))
    await until(lambda: metrics.count("mail", "sent") == 2)

    assert [e.mail_from for e in mailtrap.received] == ["spamtrap@notify.test"] * 2
    assert all(b"\n" not in e.data.replace(b"\r\n", b"") for e in mailtrap.received)  # CRLF only
    (msg,) = mailtrap.mail_to("all-list@lists.test")
    assert len(mailtrap.mail_to("second@lists.test")) == 1
    assert msg["From"] == "spamtrap@notify.test"
    assert msg["To"] == "all-list@lists.test"
    assert msg["Subject"] == (
        "[spamtrap] all: 1234 messages, 2026-11-22T13:00:00Z..2026-11-22T14:00:00Z"
    )
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == 0  # Clock time
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@notify.test>")
    assert msg["Content-Type"] == "text/plain; charset=us-ascii"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Precedence"] == "bulk"
    assert body_fields(msg) == {
        "Set": "all",
        "Key": doc["key"],
        "URL": doc["url"],
        "Size": "123456",
        "SHA256": doc["sha256"],
        "Messages": "1234",
        "First-Received": "2026-11-22T13:00:00Z",
        "Last-Received": "2026-11-22T14:00:00Z",
        "Node": "node1",
        "Format": "1",
        "Manifest-URL": doc["url"].removesuffix(".mbox.gz") + ".json",
    }
    # The relay saw our EHLO name, not the machine's (which is never looked up).
    assert mailtrap.received[0].values("helo") == ["node1.test"]
    assert metrics.count("mail", "retry") == metrics.count("mail", "failed") == 0


@pytest_twisted.ensureDeferred
async def test_mail_over_starttls_verifies_the_relay_certificate(tmp_path: Any) -> None:
    ctx = tls.context_factory(TLSConfig(), str(tmp_path), "localhost")
    with open(tmp_path / "tls" / "selfsigned.pem", "rb") as f:
        root = ssl.Certificate.loadPEM(f.read())
    trap = MailTrap(tls_context=ctx)
    port = await trap.listen()
    try:
        cfg = config(mail_set("all", "list@lists.test"), relay_port=port, starttls=True)
        metrics = NotifyMetrics()

        def trusting(host: str) -> Any:
            # The test's own trust root, and the name in the certificate.
            return ssl.optionsForClientTLS("localhost", trustRoot=root)

        n = Notifier(cfg, metrics, reactor, Clock(), client_tls=trusting)
        n.published(as_published(manifest()))
        await until(lambda: metrics.count("mail", "sent") == 1)
        (env,) = trap.received
        assert env.values("tls") and env.values("tls")[0].startswith("TLSv1.")
        assert body_fields(trap.mail_to("list@lists.test")[0])["Set"] == "all"

        # By default the certificate must chain to the system's roots: a
        # self-signed relay gets nothing, and the notice waits for a retry.
        metrics = NotifyMetrics()
        clock = Clock()
        n = Notifier(cfg, metrics, reactor, clock)
        n.published(as_published(manifest()))
        await until(lambda: metrics.count("mail", "retry") == 1)
        assert len(trap.received) == 1
        assert len(clock.getDelayedCalls()) == 1
        await n.stop()
        assert metrics.count("mail", "failed") == 1
    finally:
        await trap.close()


@pytest_twisted.ensureDeferred
async def test_starttls_required_but_not_offered_fails_permanently(mailtrap: MailTrap) -> None:
    metrics = NotifyMetrics()
    clock = Clock()
    port = mailtrap.port.getHost().port
    cfg = config(mail_set("all", "list@lists.test"), relay_port=port, starttls=True)
    n = Notifier(cfg, metrics, reactor, clock)
    n.published(as_published(manifest()))
    await until(lambda: metrics.count("mail", "failed") == 1)
    assert mailtrap.received == []
    assert metrics.count("mail", "retry") == 0
    assert clock.getDelayedCalls() == []  # a 5xx is not retried


# A relay that wants AUTH, offered only after STARTTLS, like a submission port.


@implementer(smtp.IMessage)
class _Collect:
    def __init__(self, sink: list[bytes]) -> None:
        self.sink = sink
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        self.sink.append(b"\n".join(self.lines))
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Deliver:
    def __init__(self, sink: list[bytes]) -> None:
        self.sink = sink

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: _Collect(self.sink)


class _SubmissionESMTP(smtp.ESMTP):
    def extensions(self) -> dict[bytes, Any]:
        ext = super().extensions()
        if not self.startedTLS:
            ext.pop(b"AUTH", None)
        return ext


@implementer(IRealm)
class AuthRelay(protocol.ServerFactory):
    def __init__(self, ctx: Any, username: bytes, password: bytes) -> None:
        db = InMemoryUsernamePasswordDatabaseDontUse()
        db.addUser(username, password)
        realm: Any = self  # zope interfaces do not type-check
        checker: Any = db
        self.portal = Portal(realm, [checker])
        self.ctx = ctx
        self.logins: list[bytes] = []
        self.messages: list[bytes] = []

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:
        self.logins.append(avatar_id)
        return smtp.IMessageDelivery, _Deliver(self.messages), lambda: None

    def buildProtocol(self, addr: Any) -> Any:
        chal = {b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials}
        p = _SubmissionESMTP(chal, self.ctx)
        p.portal = self.portal  # type: ignore[assignment]
        p.host = b"relay.test"
        p.factory = self
        return p


@pytest_twisted.ensureDeferred
async def test_auth_after_starttls_and_a_wrong_password_is_not_retried(tmp_path: Any) -> None:
    ctx = tls.context_factory(TLSConfig(), str(tmp_path), "localhost")
    with open(tmp_path / "tls" / "selfsigned.pem", "rb") as f:
        root = ssl.Certificate.loadPEM(f.read())
    relay = AuthRelay(ctx, b"notifier", b"s3cret")
    port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(relay)
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(f"{formatEvent(event)} {event!r}")
        if event.get("log_failure") is not None:
            logged.append(event["log_failure"].getTraceback())

    observer: Any = observe  # an ILogObserver; zope interfaces do not type-check
    globalLogPublisher.addObserver(observer)
    wrong = "Wr0ngPassw0rd"
    try:
        for password, delivered in (("s3cret", True), (wrong, False)):
            metrics = NotifyMetrics()
            cfg = config(
                mail_set("all", "list@lists.test"),
                relay_port=port.getHost().port,
                starttls=True,
                username="notifier",
                password=password,
            )
            n = Notifier(
                cfg,
                metrics,
                reactor,
                Clock(),
                client_tls=lambda host: ssl.optionsForClientTLS("localhost", trustRoot=root),
            )
            n.published(as_published(manifest()))
            outcome = "sent" if delivered else "failed"
            await until(lambda: metrics.count("mail", outcome) == 1)  # noqa: B023
            assert metrics.count("mail", "retry") == 0
        assert relay.logins == [b"notifier"]  # the wrong password got no avatar
        (message,) = relay.messages
        fields = body_fields(email.message_from_bytes(message, policy=email.policy.compat32))
        assert fields["Key"] == manifest()["key"]
        # The failure is logged with the relay's reply, never the AUTH line.
        text = "\n".join(logged)
        assert "535 Authentication failed" in text
        for secret in (wrong, f"\0notifier\0{wrong}"):
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text
    finally:
        globalLogPublisher.removeObserver(observer)
        await port.stopListening()


@pytest.mark.parametrize(
    "relay, problem",
    [
        (RelayConfig(host="relay.example", username="u", password="p"), "plaintext"),
        (RelayConfig(host="192.0.2.1", username="u", password="p"), "plaintext"),
        (RelayConfig(host="relay.example", username="u"), "both"),
        (RelayConfig(host="relay.example", password="p", starttls=True), "both"),
        (RelayConfig(host="relay.example", username="u", password="p", starttls=True), None),
        (RelayConfig(host="localhost", username="u", password="p"), None),
        (RelayConfig(host="127.0.0.2", username="u", password="p"), None),
        (RelayConfig(host="::1", username="u", password="p"), None),
        (RelayConfig(host="relay.example"), None),
    ],
)
def test_credentials_never_go_out_in_plaintext(relay: RelayConfig, problem: str | None) -> None:
    if problem is None:
        check_relay(relay)
        return
    with pytest.raises(RelayConfigError, match=problem):
        check_relay(relay)
    cfg = config(mail_set("all", "list@lists.test"))
    cfg.relay = relay
    with pytest.raises(ValueError, match=problem):  # the Notifier refuses to start
        Notifier(cfg, NotifyMetrics(), reactor, Clock())


@pytest_twisted.ensureDeferred
async def test_relay_down_then_up_is_retried_after_the_backoff() -> None:
    port = free_port()
    metrics = NotifyMetrics()
    clock = Clock()
    n = Notifier(
        config(mail_set("all", "list@lists.test"), relay_port=port), metrics, reactor, clock
    )
    n.published(as_published(manifest()))
    await until(lambda: metrics.count("mail", "retry") == 1)  # connection refused
    (retry,) = pending(clock)
    assert MAIL_RETRY_FIRST / 2 <= retry.getTime() <= MAIL_RETRY_FIRST

    trap = MailTrap()
    await trap.listen(port)
    try:
        clock.advance(MAIL_RETRY_FIRST / 2 - 0.001)
        assert retry.active()  # jitter never shortens the wait below half
        clock.advance(MAIL_RETRY_FIRST / 2 + 0.001)
        await until(lambda: metrics.count("mail", "sent") == 1)
        assert len(trap.mail_to("list@lists.test")) == 1
        assert metrics.count("mail", "failed") == 0
    finally:
        await trap.close()


@pytest_twisted.ensureDeferred
async def test_backoff_doubles_to_retry_max_and_gives_up_at_the_deadline() -> None:
    attempts: list[float] = []
    clock = Clock()

    def refuse(host: str, port: int, factory: Any) -> Any:
        attempts.append(clock.seconds())
        raise ConnectionRefusedError()

    metrics = NotifyMetrics()
    cfg = config(mail_set("all", "list@lists.test"), retry_max=3600.0)
    n = Notifier(cfg, metrics, reactor, clock, smtp_connect=refuse)
    n.published(as_published(manifest()))  # a synchronous failure does not escape
    while pending(clock):
        clock.advance(pending(clock)[0].getTime() - clock.seconds())
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    for i, gap in enumerate(gaps):
        base = min(3600.0, MAIL_RETRY_FIRST * 2**i)
        assert base / 2 <= gap <= base
    assert max(gaps) > 1800  # reached the cap's range
    assert attempts[-1] <= GIVE_UP_AFTER
    assert metrics.count("mail", "retry") == len(attempts) - 1
    assert metrics.count("mail", "failed") == 1
    assert metrics.count("mail", "sent") == 0


# -- webhooks -------------------------------------------------------------------


class HookServer(Resource):
    isLeaf = True

    def __init__(self, statuses: list[int] | None = None) -> None:
        super().__init__()
        self.statuses = list(statuses or [])
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((request.path.decode(), headers, request.content.read()))
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"thanks"


@pytest_twisted.async_yield_fixture
async def hooks() -> Any:
    server = HookServer()
    port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(Site(server))
    server.base = f"http://{LOCAL}:{port.getHost().port}"  # type: ignore[attr-defined]
    yield server
    await port.stopListening()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (the snippet in docs/notifications.md)."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("x-spamtrap-signature", ""))


@pytest_twisted.ensureDeferred
async def test_webhook_posts_a_signed_s3_style_record_and_retries_a_500(hooks: Any) -> None:
    hooks.statuses = [500, 200]
    url = hooks.base + "/hook?token=abc"
    s = SetConfig(
        name="all", notify=SetNotifyConfig(webhooks=[WebhookConfig(url=url, secret="k1")])
    )
    cfg = config(s)
    cfg.store.url = "s3://trapbucket/spam/v1"
    metrics = NotifyMetrics()
    clock = Clock()
    clock.advance(1795352400.5)  # 2026-11-22T13:00:00.500Z
    n = Notifier(cfg, metrics, reactor, clock)
    doc = manifest()
    n.published(as_published(doc))
    await until(lambda: metrics.count("webhook", "retry") == 1)
    (retry,) = pending(clock)
    clock.advance(retry.getTime() - clock.seconds())
    await until(lambda: metrics.count("webhook", "sent") == 1)

    assert len(hooks.requests) == 2
    (path, headers, body), (_, headers2, body2) = hooks.requests
    assert body2 == body and headers2[SIGNATURE_HEADER.lower()] == headers["x-spamtrap-signature"]
    assert path == "/hook"
    assert headers["content-type"] == "application/json"
    assert verify("k1", headers, body)
    assert not verify("k2", headers, body)
    assert signature("k2", body) != headers["x-spamtrap-signature"]
    assert not verify("k1", headers, body.replace(b"1234", b"1235"))
    (record,) = json.loads(body)["Records"]
    assert record == {
        "eventVersion": "2.1",
        "eventSource": "spamtrap",
        "eventTime": "2026-11-22T13:00:00.500Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": "trapbucket"},
            "object": {
                "key": "spam/v1/" + doc["key"],
                "size": 123456,
                "sha256": doc["sha256"],
            },
        },
        "spamtrap": {**doc, "manifest_url": doc["url"].removesuffix(".mbox.gz") + ".json"},
    }


@pytest_twisted.ensureDeferred
async def test_webhook_without_secret_is_unsigned_and_a_dead_receiver_is_retried() -> None:
    server = HookServer()
    port = free_port()
    s = SetConfig(
        name="all",
        notify=SetNotifyConfig(webhooks=[WebhookConfig(url=f"http://{LOCAL}:{port}/h")]),
    )
    metrics = NotifyMetrics()
    clock = Clock()
    n = Notifier(config(s), metrics, reactor, clock)
    n.published(as_published(manifest()))
    await until(lambda: metrics.count("webhook", "retry") == 1)  # nobody listening
    listening = await serverFromString(reactor, f"tcp:{port}:interface={LOCAL}").listen(
        Site(server)
    )
    try:
        (retry,) = pending(clock)
        clock.advance(retry.getTime() - clock.seconds())
        await until(lambda: metrics.count("webhook", "sent") == 1)
        ((_, headers, body),) = server.requests
        assert "x-spamtrap-signature" not in headers
        assert json.loads(body)["Records"][0]["s3"]["bucket"] == {"name": "local"}
    finally:
        await listening.stopListening()


# -- privacy --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_private_sets_bundle_reaches_only_its_own_channels(
    mailtrap: MailTrap, hooks: Any
) -> None:
    shared = SetConfig(
        name="shared",
        notify=SetNotifyConfig(
            mail=["shared-list@lists.test"],
            webhooks=[WebhookConfig(url=hooks.base + "/shared", secret="s")],
        ),
    )
    private = SetConfig(
        name="private",
        private=True,
        notify=SetNotifyConfig(
            mail=["private-list@lists.test"],
            webhooks=[WebhookConfig(url=hooks.base + "/private", secret="p")],
        ),
    )
    silent = SetConfig(name="silent")  # no channels: nothing to send
    metrics = NotifyMetrics()
    n = Notifier(
        config(shared, private, silent, relay_port=mailtrap.port.getHost().port),
        metrics,
        reactor,
        Clock(),
    )
    docs = {name: manifest(name) for name in ("shared", "private", "silent")}
    for doc in docs.values():
        n.published(as_published(doc))
    await until(lambda: metrics.count("mail", "sent") + metrics.count("webhook", "sent") == 4)
    await n.stop()

    traffic = {env.rcpts[0]: env.data for env in mailtrap.received}
    traffic.update({path: body for path, _, body in hooks.requests})
    assert sorted(traffic) == [
        "/private",
        "/shared",
        "private-list@lists.test",
        "shared-list@lists.test",
    ]
    assert len(mailtrap.received) == 2 and len(hooks.requests) == 2
    private_secrets = [docs["private"]["key"], docs["private"]["url"], "4wHkcYIyIeNMVh2Hprivate"]
    for channel, data in traffic.items():
        mine = "private" in channel
        for secret in private_secrets:
            assert (secret.encode() in data) == mine, (channel, secret)
        assert (docs["shared"]["key"].encode() in data) == (not mine)


def test_a_private_set_may_not_share_a_channel_with_another_set() -> None:
    hook = WebhookConfig(url="https://hooks.example/x")
    for private_notify, other_notify in (
        (SetNotifyConfig(mail=["list@lists.test"]), SetNotifyConfig(mail=["LIST@lists.test"])),
        (SetNotifyConfig(webhooks=[hook]), SetNotifyConfig(webhooks=[hook])),
    ):
        sets = [
            SetConfig(name="private", private=True, notify=private_notify),
            SetConfig(name="shared", notify=other_notify),
        ]
        with pytest.raises(ValueError, match="'private' is private.*serves set.*shared"):
            Notifier(config(*sets), NotifyMetrics(), reactor, Clock())
        sets[0].private = False  # two shared sets may share a list
        Notifier(config(*sets), NotifyMetrics(), reactor, Clock())


# -- never raising, stopping, bounds -------------------------------------------------


def test_published_never_raises() -> None:
    calls: list[Any] = []
    n = Notifier(
        config(mail_set("all", "list@lists.test")),
        NotifyMetrics(),
        reactor,
        Clock(),
        smtp_connect=lambda *a: calls.append(a),
    )
    n.published(as_published(manifest("unknown")))  # a set this node does not have
    n.published({"set": "all"})  # type: ignore[arg-type] # not a Published: logged
    n.published(None)  # type: ignore[arg-type]
    assert calls == []
    n.published(as_published(manifest()))
    assert len(calls) == 1


@pytest_twisted.ensureDeferred
async def test_stop_drops_waiting_retries_and_cancels_sends_at_the_deadline() -> None:
    silent = protocol.Factory.forProtocol(protocol.Protocol)  # accepts, never greets
    port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(silent)
    try:
        metrics = NotifyMetrics()
        clock = Clock()
        refused = free_port()
        cfg = config(
            mail_set("stuck", "list@lists.test"),
            mail_set("down", "other@lists.test"),
            relay_port=port.getHost().port,
        )
        attempts: list[int] = []

        def connect(host: str, p: int, factory: Any) -> Any:
            attempts.append(p)
            # The "down" set's notice goes to a closed port instead.
            target = refused if factory.toEmail == [b"other@lists.test"] else p
            return reactor.connectTCP(host, target, factory)

        n = Notifier(cfg, metrics, reactor, clock, smtp_connect=connect)
        n.published(as_published(manifest("stuck")))
        n.published(as_published(manifest("down")))
        await until(lambda: metrics.count("mail", "retry") == 1)
        assert len(clock.getDelayedCalls()) == 2  # the retry, the stuck send's timeout

        d = n.stop()
        assert metrics.count("mail", "failed") == 1  # the waiting retry, dropped
        n.published(as_published(manifest("down")))  # after stop: ignored
        assert not d.called  # the stuck send still has time
        clock.advance(STOP_DEADLINE)
        await d
        assert metrics.count("mail", "failed") == 2
        assert metrics.count("mail", "sent") == 0
        assert len(attempts) == 2
        assert clock.getDelayedCalls() == []
    finally:
        await port.stopListening()


def test_too_many_pending_notices_drop_the_oldest_waiting_one() -> None:
    clock = Clock()
    tried: list[bytes] = []

    def refuse(host: str, port: int, factory: Any) -> Any:
        tried.append(factory.toEmail[0])
        raise ConnectionRefusedError()

    metrics = NotifyMetrics()
    cfg = config(mail_set("a", "a@lists.test"), mail_set("b", "b@lists.test"))
    n = Notifier(cfg, metrics, reactor, clock, smtp_connect=refuse, max_pending=2)
    for name in ("a", "b", "a"):
        n.published(as_published(manifest(name)))
    assert metrics.count("mail", "failed") == 1  # the first "a", oldest, dropped
    assert len(clock.getDelayedCalls()) == 2
    clock.advance(MAIL_RETRY_FIRST)
    assert sorted(tried[3:]) == [b"a@lists.test", b"b@lists.test"]  # 2 retries, not 3


# -- the mail body as a format ---------------------------------------------------


@given(
    url=st.text(min_size=1, max_size=200),
    node=st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1),
)
def test_the_body_is_always_a_clean_header_block(url: str, node: str) -> None:
    doc = manifest(url=url, node=node)
    raw = notice(doc, "spamtrap@notify.test", "list@lists.test", 0.0)
    assert raw.isascii() and b"\r" not in raw
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert not msg.defects
    fields = body_fields(msg)
    assert list(fields) == [
        "Set", "Key", "URL", "Size", "SHA256", "Messages",
        "First-Received", "Last-Received", "Node", "Format",
    ]  # fmt: skip
    assert not any(c.isspace() for c in fields["URL"])
    assert fields["Node"] == node
    if "%" not in url:
        assert unquote(fields["URL"]) == url
    if all(c in string.printable and not c.isspace() for c in url):
        assert fields["URL"] == url  # ordinary URLs stay exactly as they are


def test_a_store_without_public_urls_leaves_the_url_out() -> None:
    raw = notice(manifest(url=None), "spamtrap@notify.test", "list@lists.test", 0.0)
    fields = body_fields(email.message_from_bytes(raw, policy=email.policy.compat32))
    assert "URL" not in fields and fields["Key"] == manifest()["key"]


# -- the URLs in notices -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_local_store_notice_carries_this_nodes_download_urls(
    mailtrap: MailTrap, hooks: Any
) -> None:
    s = SetConfig(
        name="all",
        notify=SetNotifyConfig(
            mail=["all-list@lists.test"], webhooks=[WebhookConfig(url=hooks.base + "/h")]
        ),
    )
    cfg = config(s, relay_port=mailtrap.port.getHost().port)
    cfg.http.public_url = "https://traps.example.org:8443/spamtrap/"
    metrics = NotifyMetrics()
    n = Notifier(cfg, metrics, reactor, Clock())
    doc = manifest(url=None)  # what BundleSet hands over for the local store
    n.published(as_published(doc))
    await until(lambda: metrics.count("mail", "sent") == metrics.count("webhook", "sent") == 1)

    url = f"https://traps.example.org:8443/spamtrap/bundles/{doc['key']}"
    manifest_url = url.removesuffix(".mbox.gz") + ".json"
    (msg,) = mailtrap.mail_to("all-list@lists.test")
    fields = body_fields(msg)
    assert (fields["URL"], fields["Manifest-URL"]) == (url, manifest_url)
    assert list(fields)[-1] == "Manifest-URL"  # new fields go at the end
    ((_, _, body),) = hooks.requests
    (record,) = json.loads(body)["Records"]
    assert record["spamtrap"] == {**doc, "url": url, "manifest_url": manifest_url}
    assert record["s3"]["bucket"] == {"name": "local"}
    assert doc["url"] is None  # the caller's manifest is left alone


def test_notice_urls() -> None:
    key = manifest()["key"]

    def with_url(url: str | None) -> Published:
        return as_published(manifest(url=url))

    base = "http://node1.example:8025"
    assert notice_urls(with_url(None), base) == (
        f"{base}/bundles/{key}",
        f"{base}/bundles/{key.removesuffix('.mbox.gz')}.json",
    )
    s3 = f"https://cdn.example/spam/{key}"
    assert notice_urls(with_url(s3), base) == (
        s3,
        s3.removesuffix(".mbox.gz") + ".json",
    )
    # A URL that does not end in the bundle's name has no manifest beside it.
    signed = f"https://s3.example/{key}?X-Amz-Signature=abc"
    assert notice_urls(with_url(signed), base) == (signed, None)
    # An S3 store without a URL for the key: this node's /bundles/<key>
    # would redirect to that missing URL, so there is none to give.
    assert notice_urls(with_url(None), base, web_served=False) == (None, None)
    assert notice_urls(with_url(s3), base, web_served=False)[0] == s3


def notify_errors(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace", "").startswith("spamtrap.notify")
        and e.get("log_level") is not None
        and e["log_level"].name == "error"
    ]


@pytest_twisted.ensureDeferred
async def test_an_s3_store_without_a_url_sends_none_and_logs_once_per_bundle(
    mailtrap: MailTrap, hooks: Any
) -> None:
    s = SetConfig(
        name="all",
        notify=SetNotifyConfig(
            mail=["a-list@lists.test", "b-list@lists.test"],
            webhooks=[WebhookConfig(url=hooks.base + "/h")],
        ),
    )
    cfg = config(s, relay_port=mailtrap.port.getHost().port)
    cfg.store.url = "s3://trapbucket/spam"  # AWS, no region: store.url() is None
    cfg.http.public_url = "https://traps.example.org"
    metrics = NotifyMetrics()
    n = Notifier(cfg, metrics, reactor, Clock())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first, second = manifest(url=None), manifest(url=None, key="all/2.mbox.gz")
        n.published(as_published(first))
        n.published(as_published(second))
        await until(lambda: metrics.count("mail", "sent") == 4)
        await until(lambda: metrics.count("webhook", "sent") == 2)
    finally:
        globalLogPublisher.removeObserver(events.append)

    for msg in mailtrap.mail_to("a-list@lists.test") + mailtrap.mail_to("b-list@lists.test"):
        fields = body_fields(msg)
        assert "URL" not in fields and "Manifest-URL" not in fields
        assert "traps.example.org" not in msg.as_string()
    for _, _, body in hooks.requests:
        (record,) = json.loads(body)["Records"]
        assert (record["spamtrap"]["url"], record["spamtrap"]["manifest_url"]) == (None, None)
    errors = notify_errors(events)
    assert len(errors) == 2  # one per bundle, not one per channel
    assert first["key"] in errors[0] and second["key"] in errors[1]
    assert "store.public_url" in errors[0]


def test_a_set_without_channels_logs_no_missing_url() -> None:
    cfg = config(SetConfig(name="all"))
    cfg.store.url = "s3://trapbucket/spam"
    n = Notifier(cfg, NotifyMetrics(), reactor, Clock())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        n.published(as_published(manifest(url=None)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert notify_errors(events) == []


def test_listen_port() -> None:
    assert listen_port("tcp:8025") == 8025
    assert listen_port("tcp:8025:interface=127.0.0.1") == 8025
    assert listen_port("tcp6:port=9000:interface=\\:\\:1") == 9000
    assert listen_port("tcp:interface=127.0.0.1:port=81") == 81
    assert listen_port("ssl:443:privateKey=k.pem") == 443
    assert listen_port("unix:/run/spamtrap.sock") is None
    assert listen_port("systemd:domain=INET:index=0") is None


def warnings_of(cfg: Config) -> list[str]:
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("spamtrap.notify"):
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        Notifier(cfg, NotifyMetrics(), reactor, Clock())
    finally:
        globalLogPublisher.removeObserver(observe)
    return seen


def test_a_public_url_that_consumers_cannot_reach_is_logged() -> None:
    cfg = config(mail_set("all", "list@lists.test"))
    # The default http://localhost:8025 with HTTP elsewhere: nowhere at all.
    cfg.http.listen = ["tcp:9025:interface=127.0.0.1"]
    (warning,) = warnings_of(cfg)
    assert "http://localhost:8025 names port 8025, but HTTP listens on tcp:9025" in warning
    # The right port, but loopback: only this machine's consumers get there.
    cfg.http.listen = ["tcp:8025"]
    (warning,) = warnings_of(cfg)
    assert "a loopback address" in warning
    cfg.http.public_url = "https://traps.example.org"  # a proxy in front: fine
    assert warnings_of(cfg) == []
    cfg.http.public_url = "http://127.0.0.1:8025"
    cfg.store.url = "s3://bucket/prefix"  # the URLs are the bucket's
    assert warnings_of(cfg) == []
    cfg.store.url = None
    cfg.sets = [SetConfig(name="all")]  # no notices: nothing to warn about
    assert warnings_of(cfg) == []
