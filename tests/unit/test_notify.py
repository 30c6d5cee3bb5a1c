"""Notifications without a network: the relay's safety checks, backoff and
give-up on a Clock, privacy between sets, bounds, the notice body format,
the URLs in notices and the warnings about them."""

from __future__ import annotations

import email
import email.parser
import email.policy
import string
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from spamtrap import testing
from spamtrap.bundle.manifest import Published
from spamtrap.config import (
    Config,
    RelayConfig,
    SetConfig,
    SetNotifyConfig,
    WebhookConfig,
)
from spamtrap.notify import (
    GIVE_UP_AFTER,
    MAIL_RETRY_FIRST,
    Notifier,
    listen_port,
    notice_urls,
)
from spamtrap.notify.mail import notice
from spamtrap.smtp_client import RelayConfigError, check_relay
from tests.support.notify import (
    NotifyMetrics,
    as_published,
    body_fields,
    config,
    mail_set,
    manifest,
    notify_errors,
    pending,
)

reactor: Any = _reactor


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
    cfg = testing.config(cfg, relay=relay)
    with pytest.raises(ValueError, match=problem):  # the Notifier refuses to start
        Notifier(cfg, NotifyMetrics(), reactor, Clock())


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
        sets[0] = testing.config(sets[0], private=False)  # two shared sets may share a list
        Notifier(config(*sets), NotifyMetrics(), reactor, Clock())


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


def test_a_set_without_channels_logs_no_missing_url() -> None:
    cfg = config(SetConfig(name="all"))
    cfg = testing.config(cfg, store__url="s3://trapbucket/spam")
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
    cfg = testing.config(cfg, http__listen=["tcp:9025:interface=127.0.0.1"])
    (warning,) = warnings_of(cfg)
    assert "http://localhost:8025 names port 8025, but HTTP listens on tcp:9025" in warning
    # The right port, but loopback: only this machine's consumers get there.
    cfg = testing.config(cfg, http__listen=["tcp:8025"])
    (warning,) = warnings_of(cfg)
    assert "a loopback address" in warning
    cfg = testing.config(
        cfg,
        http__public_url="https://traps.example.org",  # a proxy in front: fine
    )
    assert warnings_of(cfg) == []
    cfg = testing.config(
        cfg,
        http__public_url="http://127.0.0.1:8025",
        store__url="s3://bucket/prefix",  # the URLs are the bucket's
    )
    assert warnings_of(cfg) == []
    cfg = testing.config(
        cfg,
        store__url=None,
        sets=[SetConfig(name="all")],  # no notices: nothing to warn about
    )
    assert warnings_of(cfg) == []
