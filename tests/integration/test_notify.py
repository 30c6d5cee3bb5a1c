"""Notifications: list mail through a real loopback relay, webhooks to a real
loopback web server, retries on a Clock, stop.

The network I/O is real (the default reactor, 127.0.0.1 only); backoff and
deadlines run on a task.Clock the tests advance."""

from __future__ import annotations

import base64
import email
import email.parser
import email.policy
import json
from typing import Any

import pytest_twisted
from twisted.internet import protocol, ssl
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.server import Site

from spamtrap import testing
from spamtrap.config import (
    SetConfig,
    SetNotifyConfig,
    TLSConfig,
    WebhookConfig,
)
from spamtrap.intake import tls
from spamtrap.notify import (
    MAIL_RETRY_FIRST,
    STOP_DEADLINE,
    Notifier,
)
from spamtrap.notify.webhook import SIGNATURE_HEADER, signature
from tests.support.node import free_port
from tests.support.notify import (
    AuthRelay,
    HookServer,
    MailTrap,
    NotifyMetrics,
    as_published,
    body_fields,
    config,
    mail_set,
    manifest,
    notify_errors,
    pending,
    verify,
)
from tests.support.poll import until

reactor: Any = _reactor
LOCAL = "127.0.0.1"


# -- a real SMTP server: spamtrap's own, catching everything -----------------


@pytest_twisted.async_yield_fixture
async def mailtrap() -> Any:
    trap = MailTrap()
    await trap.listen()
    yield trap
    await trap.close()


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


# -- webhooks -------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def hooks() -> Any:
    server = HookServer()
    port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(Site(server))
    server.base = f"http://{LOCAL}:{port.getHost().port}"  # type: ignore[attr-defined]
    yield server
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_webhook_posts_a_signed_s3_style_record_and_retries_a_500(hooks: Any) -> None:
    hooks.statuses = [500, 200]
    url = hooks.base + "/hook?token=abc"
    s = SetConfig(
        name="all", notify=SetNotifyConfig(webhooks=[WebhookConfig(url=url, secret="k1")])
    )
    cfg = config(s)
    cfg = testing.config(cfg, store__url="s3://trapbucket/spam/v1")
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


# -- never raising, stopping, bounds -------------------------------------------------


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


# -- the mail body as a format ---------------------------------------------------


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
    cfg = testing.config(cfg, http__public_url="https://traps.example.org:8443/spamtrap/")
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
    cfg = testing.config(
        cfg,
        store__url="s3://trapbucket/spam",  # AWS, no region: store.url() is None
        http__public_url="https://traps.example.org",
    )
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


