"""Real servers for notification tests, run in-process on the test reactor:
spamtrap's own SMTP server catching every notice mail (MailTrap), and a web
server recording every webhook (HookServer), with the receiver's signature
check (verify)."""

from __future__ import annotations

import email
import email.parser
import email.policy
import hashlib
import hmac
from typing import Any

from prometheus_client import Counter
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.web.resource import Resource
from zope.interface import implementer

from spamtrap import testing
from spamtrap.bundle.manifest import Manifest, Published
from spamtrap.config import (
    Config,
    RelayConfig,
    SetConfig,
    SetNotifyConfig,
)
from spamtrap.intake.smtp import TrapSMTPFactory
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics

LOCAL = "127.0.0.1"
reactor: Any = _reactor


class MailTrap:
    def __init__(self, tls_context: Any = None) -> None:
        cfg = testing.config(node="relay", smtp__hostname="relay.test", traps__catch_all=True)
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


def body_fields(msg: email.message.Message) -> dict[str, str]:
    payload = msg.get_payload()
    assert isinstance(payload, str)
    return dict(email.parser.HeaderParser().parsestr(payload).items())


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


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (the snippet in docs/notifications.md)."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("x-spamtrap-signature", ""))


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
    cfg = testing.config(
        node="node1",
        smtp__hostname="node1.test",
        sets=list(sets),
        relay=RelayConfig(host=LOCAL, port=relay_port, sender="spamtrap@notify.test", **relay),
    )
    return cfg


def mail_set(name: str, *addresses: str, private: bool = False) -> SetConfig:
    return SetConfig(name=name, private=private, notify=SetNotifyConfig(mail=list(addresses)))


def pending(clock: Clock) -> list[Any]:
    """The clock's delayed calls (typed loosely: zope interfaces do not type-check)."""
    return list(clock.getDelayedCalls())


def notify_errors(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace", "").startswith("spamtrap.notify")
        and e.get("log_level") is not None
        and e["log_level"].name == "error"
    ]


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
