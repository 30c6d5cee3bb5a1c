"""Output ``type: pyzor``: report each message to Pyzor servers.

Each message is reported (``Op: report``) to every server in ``servers``,
signed for ``user`` (default: anonymous). The digest is Pyzor's own
(``pyzor.digest.DataDigester`` over the parsed message, what ``pyzor
check`` computes from the same bytes), taken of the copy the set keeps:
redaction changes no digest, since Pyzor drops addresses and long tokens
before digesting.

Digesting costs about 15 ms per 100 KiB of text and twice that for HTML,
too much for the reactor thread, so it runs in a small thread pool of the
output's own (started at the first send, stopped at ``close``). The
requests go out through ``_pyzor_wire.PyzorClient``, one connected UDP
socket per server, opened on first use and opened again (the host name
resolved again) after the server was found unreachable.

How a send ends (docs/outputs.md has the table):

- every server answered 200: sent;
- a server answered 400 (bad request), 501 or 505 (unsupported): a
  permanent failure, ``bad-request`` or ``unsupported``;
- a timeout, an ICMP "port unreachable" (``refused``), only garbage back
  (``garbage``), 401/403 (the account is not accepted: ``unauthorized``,
  ``forbidden``) or a 5xx (``server-error``): temporary, retried.

A retry goes only to the servers that have not accepted the message yet
(remembered in memory for the last ``_DONE_KEPT`` messages), so a server
that was down does not make the others count a message twice; the same
goes for a message kept in two sets the output lists: one report. After a
restart a retry goes to every server again.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyzor
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from spamtrap.config.rules import _describe, _domain, _duration, _nonempty, rule
from spamtrap.config.schema import OutputConfig
from spamtrap.outputs import _pyzor_wire as wire
from spamtrap.outputs.base import OutputContext, OutputItem, PermanentFailure, TemporaryFailure

log = Logger()

T = TypeVar("T")

# Pyzor's account names (docs/accounts.rst of the pyzor project).
_USER_RE = re.compile(r"[-.\w]+", re.ASCII)
_KEY_RE = re.compile(r"(?:[0-9a-fA-F]*,)?([0-9a-fA-F]+)")
_DONE_KEPT = 10_000  # messages whose accepting servers are remembered for retries
_DIGEST_THREADS = 2


def _server(value: object) -> str:
    """A "host:port" server address; an IPv6 address goes in brackets."""
    if not isinstance(value, str):
        raise ValueError(f"expected a server such as '127.0.0.1:24441', got {_describe(value)}")
    host, port = split_server(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_server(value: str) -> tuple[str, int]:
    """(host, port) of a "host:port" server address. Raises ValueError."""
    text = value.strip()
    hint = "expected host:port, e.g. '127.0.0.1:24441' or 'public.pyzor.org:24441'"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"bad server address {value!r}: {hint}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad server address {value!r}: {host!r} is not an IPv6 address")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"bad server address {value!r}: {hint}")
        if ":" in host:
            raise ValueError(
                f"bad server address {value!r}: put an IPv6 address in brackets, e.g. '[::1]:24441'"
            )
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            try:
                host = _domain(host)
            except ValueError:
                raise ValueError(f"bad server address {value!r}: {host!r} is not a host name")
            if host.replace(".", "").isdigit():
                raise ValueError(f"bad server address {value!r}: {host!r} is not an IPv4 address")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad server address {value!r}: the port must be 1-65535")
    return host, int(port_text)


def _user(value: object) -> str:
    s = _nonempty(value)
    if not _USER_RE.fullmatch(s):
        raise ValueError(f"bad Pyzor user {s!r}: use letters, digits, '_', '.', '-'")
    return s


def parse_key(value: str) -> str:
    """The signing key of a Pyzor account from what ``pyzor genkey`` prints
    ("salt,key") or the key alone. Raises ValueError."""
    m = _KEY_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            "not a Pyzor key: expected hex digits, as 'pyzor genkey' prints 'salt,key'"
        )
    return m[1].lower()


def _key(value: object) -> str:
    s = _nonempty(value)
    parse_key(s)
    return s


def read_key_file(path: str) -> str:
    """The key on the first line of ``path``. Raises OSError or ValueError."""
    with open(path, encoding="utf-8") as f:
        return parse_key(f.readline())


@dataclass(frozen=True, kw_only=True)
class Settings(OutputConfig):
    # The Pyzor servers, each "host:port" (an IPv6 address in brackets,
    # a host name is resolved when the socket is opened). Each message is
    # reported to every one. Pyzor's public server is public.pyzor.org:24441.
    servers: list[str] = field(metadata=rule(_server, one_or_many=True, nonempty=True))
    # Seconds to wait for a server's reply (Pyzor's own client waits 5).
    timeout: float = field(default=5.0, metadata=rule(_duration(positive=True)))
    # The account that signs the reports: "anonymous" (no key), or the
    # user a server's admin set up in pyzord.passwd, with its key.
    user: str = field(default=pyzor.anonymous_user, metadata=rule(_user))
    # That account's key, as `pyzor genkey` prints it ("salt,key") or the
    # key alone; key_file keeps it out of the config (its first line).
    key: str | None = field(default=None, metadata=rule(_key))
    key_file: str | None = field(default=None, metadata=rule(_nonempty))

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        seen: set[str] = set()
        for server in self.servers:
            if server in seen:
                found.append(("servers", f"{server} is listed twice"))
            seen.add(server)
        anonymous = self.user == pyzor.anonymous_user
        if self.key is not None and self.key_file is not None:
            found.append(("key", "give key or key_file, not both"))
        elif anonymous and (self.key is not None or self.key_file is not None):
            which = "key" if self.key is not None else "key_file"
            found.append((which, "the anonymous user has no key; set user too"))
        elif not anonymous and self.key is None and self.key_file is None:
            found.append(("user", f"user {self.user!r} needs its key (key or key_file)"))
        elif self.key_file is not None:
            try:
                read_key_file(self.key_file)
            except (OSError, ValueError) as e:
                found.append(("key_file", f"cannot read a key from {self.key_file!r}: {e}"))
        return found


@dataclass
class _Server:
    host: str  # as configured: an address or a host name
    port: int
    label: str  # "host:port", for logs and the memory of retries
    literal: bool  # an IP address: nothing to resolve
    client: wire.PyzorClient | None = None


class PyzorOutput:
    """Reports each item to every server; see the module docstring."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        context: OutputContext,
        run_in_thread: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.reactor = context.reactor
        self._run_in_thread = run_in_thread
        self._pool: ThreadPool | None = None
        self._servers = []
        self._clients: set[wire.PyzorClient] = set()  # open or closing sockets
        for text in settings.servers:
            host, port = split_server(text)
            self._servers.append(_Server(host, port, _server(text), _is_address(host)))
        self._account: wire.Account | None = None
        # item id -> the labels of the servers that accepted it, for the
        # last _DONE_KEPT messages
        self._done: OrderedDict[str, set[str]] = OrderedDict()
        self._closed = False

    def describe(self) -> str:
        return (
            f"pyzor report to {', '.join(s.label for s in self._servers)} as {self.settings.user}"
        )

    # -- sending ----------------------------------------------------------------

    def send(self, item: OutputItem) -> defer.Deferred[object]:
        return defer.ensureDeferred(self._send(item))

    async def _send(self, item: OutputItem) -> object:
        if self._closed:
            raise TemporaryFailure("stopped", "output closed")
        account = self._signing_account()
        value = await self._digest(item.original())
        # The servers that accepted this message already: on a retry, and
        # for the same message kept in another set this output lists.
        done = self._done.get(item.id, set())
        todo = [s for s in self._servers if s.label not in done]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._report(s, value, account)) for s in todo],
            consumeErrors=True,
        )
        failures: list[BaseException] = []
        for server, (ok, result) in zip(todo, results, strict=True):
            if ok:
                done.add(server.label)
            else:
                failure: Any = result
                failures.append(failure.value)
        self._remember(item.id, done)
        temporary = [f for f in failures if not isinstance(f, PermanentFailure)]
        if temporary:
            raise temporary[0]  # retried, by the runner
        if failures:
            raise failures[0]
        return value

    def _remember(self, item_id: str, done: set[str]) -> None:
        self._done[item_id] = done
        self._done.move_to_end(item_id)
        while len(self._done) > _DONE_KEPT:
            self._done.popitem(last=False)

    def _signing_account(self) -> wire.Account:
        if self._account is None:
            s = self.settings
            if s.key_file is not None:
                try:
                    key = read_key_file(s.key_file)
                except (OSError, ValueError) as e:
                    # Checked at load: it went away since. It may come back.
                    raise TemporaryFailure("key-file", f"{s.key_file}: {e}")
            else:
                key = parse_key(s.key) if s.key is not None else ""
            self._account = wire.Account(s.user, key)
        return self._account

    async def _digest(self, data: bytes) -> str:
        try:
            value: str = await self._in_thread(lambda: wire.digest(data))
        except Exception as e:  # noqa: BLE001 - whatever Pyzor's digester raises
            # Pyzor's own code cannot digest it (a known case: HTML whose
            # marked section html.parser refuses); it never will.
            raise PermanentFailure("digest", f"{type(e).__name__}: {e}")
        return value

    def _in_thread(self, f: Callable[[], T]) -> defer.Deferred[T]:
        if self._run_in_thread is not None:
            return self._run_in_thread(f)
        if self._pool is None:
            self._pool = ThreadPool(0, _DIGEST_THREADS, name=f"spamtrap-pyzor-{self.name}")
            self._pool.start()
        return deferToThreadPool(self.reactor, self._pool, f)

    async def _report(self, server: _Server, value: str, account: wire.Account) -> None:
        client = await self._client(server)
        timestamp = int(self.reactor.seconds())
        try:
            reply = await client.request(
                lambda thread: wire.build_report(value, thread, account, timestamp)
            )
        except TemporaryFailure as e:
            if client.broken or e.reason == "timeout":
                self._drop(server, client)
            raise
        wire.outcome(reply)

    async def _client(self, server: _Server) -> wire.PyzorClient:
        if server.client is None or server.client.broken:
            address = server.host
            if not server.literal:
                try:
                    address = await self.reactor.resolve(server.host)
                except Exception as e:  # noqa: BLE001 - any resolver error: try again later
                    raise TemporaryFailure("dns", f"{server.label}: {e}")
            # Another send may have opened one while this one resolved.
            if server.client is None or server.client.broken:
                server.client = self._open(server, address)
        return server.client

    def _open(self, server: _Server, address: str) -> wire.PyzorClient:
        client = wire.PyzorClient(self.reactor, address, server.port, self.settings.timeout)
        interface = "::" if ":" in address else "0.0.0.0"  # noqa: S104 - a client socket
        try:
            self.reactor.listenUDP(0, client, interface=interface, maxPacketSize=wire.MAX_PACKET)
        except OSError as e:
            raise TemporaryFailure("unreachable", f"{server.label}: {e}")
        self._clients = {c for c in self._clients if not c.stopped}
        self._clients.add(client)
        return client

    def _drop(self, server: _Server, client: wire.PyzorClient) -> None:
        # The next send opens a new socket (resolving a host name again);
        # this one closes once its last request is answered or timed out.
        if server.client is client:
            server.client = None
        client.retire()

    def close(self) -> defer.Deferred[None] | None:
        """Fail what is in flight (it stays queued) and let go of the
        sockets and the digest threads."""
        self._closed = True
        closing = []
        for server in self._servers:
            server.client = None
        for client in self._clients:  # retired ones too
            d = client.close()
            if d is not None:
                closing.append(d)
        self._clients.clear()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if not closing:
            return None
        return defer.gatherResults(closing).addCallback(lambda _: None)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build(name: str, settings: Settings, context: OutputContext) -> PyzorOutput:
    return PyzorOutput(name, settings, context)


__all__ = ["PyzorOutput", "Settings", "build", "parse_key", "split_server"]
