"""Typed configuration.

The dataclasses below are the whole configuration as the rest of spamtrap sees
it. ``load_config`` turns YAML into them; it is strict: unknown keys and bad
values are errors that carry the line number in the file. Config is always
passed in, never global, so two services can run in one test process.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass
class TLSConfig:
    # PEM files. With neither given, a self-signed certificate for the SMTP
    # hostname is generated at start and kept in DATA/tls/.
    certificate: str | None = None
    key: str | None = None
    enabled: bool = True


@dataclass
class TimeoutConfig:
    # Seconds of silence allowed while in command mode. RFC 5321 4.5.3.2
    # suggests 5 minutes; slow spam bots sit well inside that.
    command: float = 300.0
    # Seconds of silence allowed inside DATA (RFC 5321: 3 minutes per block;
    # a trap waits longer because bots on bad links are the data we want).
    data: float = 600.0
    # Hard cap on one session's total length, whatever it does: stops
    # slow-loris clients that trickle a byte a minute.
    session: float = 1800.0
    # Seconds to wait before sending the greeting. 0 = greet at once. A
    # positive value detects "early talkers" (recorded, never rejected).
    greeting_delay: float = 0.0


@dataclass
class ProxyConfig:
    # PROXY protocol v1/v2 is accepted only from these networks (CIDR). Empty
    # = off. A connection from a trusted network *must* start with a header.
    trusted_networks: list[str] = field(default_factory=list)


@dataclass
class SMTPConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp:2525"])
    # The name in the banner, EHLO reply and trap-hop Received line. Never
    # looked up: socket.getfqdn() at import is what Twisted does, not us.
    hostname: str = field(default_factory=socket.gethostname)
    max_message_size: int = 8 * MIB
    max_connections: int = 20000
    max_connections_per_ip: int = 0  # 0 = off
    max_recipients: int = 1000
    # Longest command line accepted; longer input without a line end is cut
    # off with 421 (protects the reactor from unbounded buffers).
    max_command_line: int = 4096
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    proxy_protocol: ProxyConfig = field(default_factory=ProxyConfig)
    # Reverse DNS of the peer, looked up without delaying the 250.
    rdns: bool = False


@dataclass
class HTTPConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp:8025"])
    # Base URL that consumers use to download bundles (used in notices).
    public_url: str = "http://localhost:8025"


@dataclass
class FeedConfig:
    """A forwarder's feed address (use cases B and D)."""

    id: str
    address: str


@dataclass
class TrapConfig:
    # Any local part at these domains is a trap.
    domains: list[str] = field(default_factory=list)
    # Single trap addresses.
    addresses: list[str] = field(default_factory=list)
    # Regexps matched (search, case-insensitive) against the whole recipient.
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    # Accept every recipient (the embedded default's catch-all trap).
    catch_all: bool = False


@dataclass
class SpoolConfig:
    max_bytes: int = 1 * GIB
    max_messages: int = 1_000_000
    max_age: float = 86400.0
    # Longest wait before a group commit is flushed (seconds). Appends
    # arriving in that window share one fsync.
    commit_interval: float = 0.002
    segment_bytes: int = 64 * MIB
    # fsync at all. Off only for benchmarks that measure the cost of it.
    fsync: bool = True


@dataclass
class FilterConfig:
    # Bounded thread pool for filter stages and bundle writes.
    workers: int = 2
    # Stage "size": discard messages above this many bytes.
    max_size: int = 4 * MIB


@dataclass
class Condition:
    """One condition of a set rule.

    Exactly one of ``header`` (a message header name) or ``meta`` (a metadata
    field name, see spamtrap.message.META_FIELDS) is set; ``regex`` is
    searched in every value of it (case-insensitive).
    """

    regex: re.Pattern[str]
    header: str | None = None
    meta: str | None = None


@dataclass
class RotateConfig:
    max_bytes: int = 64 * MIB  # compressed bytes written
    max_messages: int = 100_000
    max_age: float = 3600.0


@dataclass
class SetConfig:
    name: str
    # Every condition must hold (AND). Empty: the set takes everything.
    match: list[Condition] = field(default_factory=list)
    # A message matching any of these is left out.
    exclude: list[Condition] = field(default_factory=list)
    rotate: RotateConfig = field(default_factory=RotateConfig)
    # N open files per period; each message goes to one chosen at random.
    shards: int = 1
    # Bearer token for listing this set over HTTP (None: listing disabled).
    token: str | None = None


@dataclass
class StoreConfig:
    # file:///path or s3://bucket/prefix. None: DATA/bundles.
    url: str | None = None


@dataclass
class Config:
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    data_dir: str = "./spamtrap-data"
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    traps: TrapConfig = field(default_factory=TrapConfig)
    feeds: list[FeedConfig] = field(default_factory=list)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sets: list[SetConfig] = field(default_factory=list)
    store: StoreConfig = field(default_factory=StoreConfig)


def default_config() -> Config:
    """The embedded default: a catch-all trap, one set ``all``."""
    cfg = Config()
    cfg.traps.catch_all = True
    cfg.sets = [SetConfig(name="all")]
    return cfg
