"""What the trap's SMTP sessions share, and the limits that protect the host.

:class:`SessionHost` (the base of :class:`spamtrap.intake.smtp.TrapSMTPFactory`)
holds the config, the spool hand-off and the counters every session shares:
the connection limits in total and per client (:func:`client_key`), the
trusted PROXY balancers and MX relays, and the stop that closes every
session within ``smtp.stop_grace``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol
from twisted.logger import Logger

from spamtrap.config import Config
from spamtrap.intake.spill import SpillDir
from spamtrap.intake.traps import TrapMatcher
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics

if TYPE_CHECKING:
    from spamtrap.intake.smtp import TrapSMTP

log = Logger(namespace="spamtrap.intake.smtp")

# Seconds after the stop grace before connections still open are aborted.
HARD_CLOSE_DELAY = 2.0


def client_key(host: str) -> str:
    """What the per-IP limit counts: the address, an IPv4-mapped one as
    IPv4, and IPv6 by /64 (one host owns a whole /64, RFC 4291 2.5.1)."""
    if ":" not in host:
        # Twisted's IPv4 peer is already dotted-quad: skip the parse (it ran
        # for every connection and cost about 8 us).
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # a UNIX socket or the like: counted as one peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address, an IPv4-mapped IPv6 one as its IPv4 one (a
    dual-stack listener sees IPv4 peers so); None if it is not one."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _in_networks(host: str, networks: list[Any]) -> bool:
    """Whether the address ``host`` is in one of ``networks``."""
    if not networks:
        return False
    ip = _address(host)
    return ip is not None and any(ip in net for net in networks)


class SessionHost(protocol.ServerFactory):
    """What sessions share: config, limits, the spool hand-off, the stop.

    :class:`spamtrap.intake.smtp.TrapSMTPFactory` adds ``buildProtocol``.
    """

    def __init__(
        self,
        config: Config,
        submit: Callable[[Envelope], defer.Deferred[Any]],
        metrics: Metrics,
        clock: Any,
        tls_context: Any = None,
        resolve_ptr: Callable[[str], defer.Deferred[str]] | None = None,
        spill: SpillDir | None = None,
    ) -> None:
        self.config = config
        # Where DATA over smtp.data_memory_budget goes; None: kept in memory.
        self.spill = spill
        self.data_in_memory = 0  # bytes of unfinished DATA held, all sessions
        self.submit = submit
        self.metrics = metrics
        self.clock = clock
        name = config.smtp.hostname
        self.host = name.encode("idna") if name.isascii() else b"localhost"
        self.host_text = self.host.decode("ascii")
        # by (whether STARTTLS is offered, whether the peer is a trusted relay)
        self.ehlo_replies: dict[tuple[bool, bool], bytes] = {}
        # The longest command line, its line end included (longer: 500, dropped).
        self.buffer_cap = max(config.smtp.max_command_line, 512)
        self.tls_context = tls_context
        self.resolve_ptr = resolve_ptr
        self.traps = TrapMatcher(config.traps, config.feeds)
        networks = config.smtp.proxy_protocol.trusted_networks
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.relays = [ipaddress.ip_network(n, strict=False) for n in config.smtp.trusted_relays]
        self.sessions: set[TrapSMTP] = set()
        metrics.connections_open.set_function(lambda: len(self.sessions))  # read at scrape time
        self.per_ip: dict[str, int] = {}
        self.stopping = False
        self._idle: defer.Deferred[None] | None = None
        self._hard_timer: Any = None

    def trusts_proxy(self, host: str) -> bool:
        """Whether ``host`` may send a PROXY header (proxy_protocol.trusted_networks)."""
        return _in_networks(host, self.trusted)

    def trusts_relay(self, host: str) -> bool:
        """Whether ``host`` is an MX relay whose word on the client counts."""
        return _in_networks(host, self.relays)

    def trusts_hop(self, host: str) -> bool:
        """Whether a Received line's from-address is a hop inside the relay
        chain: a trusted relay, or loopback (content filters such as amavis
        hand mail back to Postfix over loopback)."""
        ip = _address(host)
        return ip is not None and (ip.is_loopback or any(ip in net for net in self.relays))

    def admit(self, session: TrapSMTP) -> str | None:
        """Host protection, not backpressure: returns a refusal reason or None.

        At connect only the total is checked: behind a trusted PROXY balancer
        the peer is the balancer until the header names the client, so the
        per-IP count waits for :meth:`admit_peer`.
        """
        if len(self.sessions) >= self.config.smtp.max_connections:
            return "max_connections"
        self.sessions.add(session)
        return None

    def admit_peer(self, session: TrapSMTP) -> str | None:
        """Count the session against its client's address (after any PROXY
        header); a refusal reason or None. Trusted relays are not counted:
        they carry many clients, and limit each one themselves (Postfix's
        smtpd_client_connection_count_limit)."""
        limit = self.config.smtp.max_connections_per_ip
        if not limit or session._from_relay():  # the session keeps the answer
            return None
        key = client_key(session.peer[0])
        n = self.per_ip.get(key, 0)
        if n >= limit:
            return "max_connections_per_ip"
        self.per_ip[key] = n + 1
        session._counted_as = key
        return None

    def release(self, session: TrapSMTP) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        key = session._counted_as
        if key is not None:
            session._counted_as = None
            n = self.per_ip.get(key, 1) - 1
            if n > 0:
                self.per_ip[key] = n
            else:
                self.per_ip.pop(key, None)
        if not self.sessions and self._idle is not None:
            self._finish_shutdown()

    def shutdown(self) -> defer.Deferred[None]:
        """Stop taking mail: close idle sessions now and busy ones after
        their reply; after ``smtp.stop_grace`` close every session with 421.
        Fires once every session is gone (bounded: see _hard_close)."""
        self.stopping = True
        grace = self.config.smtp.stop_grace
        for s in list(self.sessions):
            s.shutdown(grace)
        if not self.sessions:
            return defer.succeed(None)
        self._idle = defer.Deferred()
        # A peer that reads nothing keeps a closing connection open until its
        # write buffer drains: after the grace and a little more, cut it.
        self._hard_timer = self.clock.callLater(grace + HARD_CLOSE_DELAY, self._hard_close)
        return self._idle

    def _hard_close(self) -> None:
        self._hard_timer = None
        for s in list(self.sessions):
            log.warn(
                "session {sid} from {peer} did not close on stop; aborting it",
                sid=s.session_id,
                peer=s.peer[0],
            )
            s.transport.abortConnection()
            # abortConnection reports connectionLost later; do not wait for it.
            self.release(s)

    def _finish_shutdown(self) -> None:
        t, self._hard_timer = self._hard_timer, None
        if t is not None and t.active():
            t.cancel()
        d, self._idle = self._idle, None
        if d is not None:
            d.callback(None)
