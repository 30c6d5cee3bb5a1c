"""The configuration's declarations: one dataclass per section.

The dataclasses are the whole configuration as the rest of spamtrap sees it.
Each key is declared once, here (the ``filters`` section in
spamtrap.config.filter_schema, ``outputs`` in spamtrap.config.output_schema):
its type, its default, the comment that documents it and, in
``metadata=rule(...)``, the rule that checks it (spamtrap.config.rules).
A field without a rule is read by its type's default parser (an int at
least 0, a float as a duration). Cross-checks between keys are in
spamtrap.config.checks. etc/spamtrap.yaml and the README's and operators'
guide's key tables are checked against these declarations by
tests/unit/test_config.py.

The loaded config is frozen: nothing changes it once it is built. Code
that needs a variant builds one with ``dataclasses.replace``; tests use
``spamtrap.testing.config(base, smtp__rdns=True, ...)``, nested keys joined
by ``__``, or parse YAML with ``parse_config``.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from spamtrap.config.filter_schema import FilterConfig
from spamtrap.config.output_schema import OutputConfig, output_kind
from spamtrap.config.rules import (
    GIB,
    MIB,
    _address,
    _base_url,
    _choice,
    _dashboard_access,
    _domain,
    _duration,
    _endpoint,
    _header_name,
    _hostname,
    _http_url,
    _integer,
    _meta_field,
    _name,
    _network,
    _node_name,
    _nonempty,
    _port,
    _received_host,
    _regex,
    _role,
    _size,
    _store_url,
    parse_redis_url,
    rule,
)
from spamtrap.message import LINE_ENDINGS


@dataclass(frozen=True)
class TLSConfig:
    # PEM files. With neither given, a self-signed certificate for the SMTP
    # hostname is generated at start and kept in DATA/tls/.
    certificate: str | None = None
    key: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class TimeoutConfig:
    # Seconds of silence allowed while in command mode. RFC 5321 4.5.3.2
    # suggests 5 minutes; slow spam bots sit well inside that.
    command: float = field(default=300.0, metadata=rule(_duration(positive=True)))
    # Seconds of silence allowed inside DATA (RFC 5321: 3 minutes per block;
    # a trap waits longer because bots on bad links are the data we want).
    data: float = field(default=600.0, metadata=rule(_duration(positive=True)))
    # Hard cap on one session's total length, whatever it does: stops
    # slow-loris clients that trickle a byte a minute.
    session: float = field(default=1800.0, metadata=rule(_duration(positive=True)))
    # Seconds to wait before sending the greeting. 0 = greet at once. A
    # positive value detects "early talkers" (recorded, never rejected).
    greeting_delay: float = 0.0
    # Seconds of silence allowed while no transaction is open (after the
    # greeting, after each reply to DATA): idle sessions hold connection
    # slots. The command timeout still applies once MAIL is accepted.
    idle_before_mail: float = field(default=60.0, metadata=rule(_duration(positive=True)))


@dataclass(frozen=True)
class ProxyConfig:
    # PROXY protocol v1/v2 is accepted only from these networks (CIDR). Empty
    # = off. A connection from a trusted network *must* start with a header.
    trusted_networks: list[str] = field(default_factory=list, metadata=rule(_network))


@dataclass(frozen=True)
class SMTPConfig:
    listen: list[str] = field(
        default_factory=lambda: ["tcp:2525"], metadata=rule(_endpoint, one_or_many=True)
    )
    # The name in the banner, EHLO reply and trap-hop Received line. Never
    # looked up: socket.getfqdn() at import is what Twisted does, not us.
    hostname: str = field(default_factory=socket.gethostname, metadata=rule(_hostname))
    max_message_size: int = field(default=8 * MIB, metadata=rule(_size()))
    max_connections: int = field(default=20000, metadata=rule(_integer(1)))
    # Per client address (IPv6: per /64), counted after any PROXY header;
    # generous for bots behind NAT. 0 = off.
    max_connections_per_ip: int = 200
    # Unfinished DATA held in memory across all sessions; above it a
    # session's DATA goes to a spill file under DATA/spill/<node>/.
    data_memory_budget: int = field(default=64 * MIB, metadata=rule(_size(MIB)))
    # One session's DATA larger than this always goes to a spill file.
    data_spill_threshold: int = field(default=1 * MIB, metadata=rule(_size(64 * 1024)))
    # On stop, sessions get this long to finish; then 421 and closed.
    stop_grace: float = field(default=10.0, metadata=rule(_duration()))
    max_recipients: int = field(default=1000, metadata=rule(_integer(1)))
    # Longest command line accepted; longer input without a line end is cut
    # off with 421 (protects the reactor from unbounded buffers).
    # RFC 5321 4.5.3.1.4: a command line may be 512 octets; never cut below.
    max_command_line: int = field(default=4096, metadata=rule(_size(512)))
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    proxy_protocol: ProxyConfig = field(default_factory=ProxyConfig)
    # MX relays (CIDR) whose XFORWARD/XCLIENT name the real client; without
    # those, the client is read from the message's Received lines, walking
    # down while the hop is a trusted relay or loopback. Empty = none.
    trusted_relays: list[str] = field(default_factory=list, metadata=rule(_network))
    # Reverse DNS of the peer, looked up without delaying the 250.
    rdns: bool = False


@dataclass(frozen=True)
class HTTPConfig:
    listen: list[str] = field(
        default_factory=lambda: ["tcp:8025"], metadata=rule(_endpoint, one_or_many=True)
    )
    # Base URL that consumers use to download bundles (used in notices).
    public_url: str = field(default="http://localhost:8025", metadata=rule(_base_url))
    # Who may see /dashboard, the live page: "open" (whoever reaches this
    # server, like /metrics), "token" (only with dashboard_token, given as
    # ?token= or Authorization: Bearer) or "off" (404).
    dashboard: str = field(default="open", metadata=rule(_dashboard_access))
    # The dashboard's token for dashboard: token (None: it answers 403 until
    # one is set).
    dashboard_token: str | None = field(default=None, metadata=rule(_nonempty))


@dataclass(frozen=True)
class FeedConfig:
    """A forwarder's feed address (use cases B and D)."""

    id: str = field(metadata=rule(_name))
    address: str = field(metadata=rule(_address))
    # Header fields the donor's systems added, removed before storing: each
    # regexp is matched against a whole header field name. None: the built-in
    # list (spamtrap.filters.feeds.DEFAULT_STRIP).
    strip_headers: list[re.Pattern[str]] | None = None
    # Deprecated: the first N Received lines, whoever added them. 0 = none.
    # Cannot be combined with strip_received_by / strip_received_by_regex.
    strip_received: int = field(default=0, metadata=rule(_integer(0)))
    # The donor's own hosts, as their MTAs name themselves in the "by" part
    # of a Received line (exact, case-insensitive, trailing dot ignored) or
    # as regexps matched against the whole by-host. The donor's lines are
    # removed from the top; the one recording the hand-over from outside,
    # and everything below it, stays (spamtrap.filters.feeds.donor_received).
    strip_received_by: list[str] = field(
        default_factory=list, metadata=rule(_received_host, one_or_many=True)
    )
    strip_received_by_regex: list[re.Pattern[str]] = field(
        default_factory=list, metadata=rule(_regex, one_or_many=True)
    )
    # Networks of the donor's own hosts: a hop from one of these (or from
    # loopback) into a donor host is the donor's, not the spam's entry.
    donor_networks: list[str] = field(
        default_factory=list, metadata=rule(_network, one_or_many=True)
    )
    # The donor forwards spam as attachments: store every attached
    # message/rfc822 part as a message of its own (and not the wrapper).
    extract_attached: bool = False


@dataclass(frozen=True)
class TrapConfig:
    # Any local part at these domains is a trap.
    domains: list[str] = field(default_factory=list, metadata=rule(_domain))
    # Single trap addresses.
    addresses: list[str] = field(default_factory=list, metadata=rule(_address))
    # Regexps matched (search, case-insensitive) against the whole recipient.
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    # Accept every recipient (the embedded default's catch-all trap).
    catch_all: bool = False


@dataclass(frozen=True)
class SpoolConfig:
    max_bytes: int = field(default=1 * GIB, metadata=rule(_size()))
    max_messages: int = field(default=1_000_000, metadata=rule(_integer(1)))
    max_age: float = field(default=86400.0, metadata=rule(_duration(positive=True)))
    # Longest wait before a group commit is flushed (seconds). Appends
    # arriving in that window share one fsync.
    commit_interval: float = 0.002
    segment_bytes: int = field(default=64 * MIB, metadata=rule(_size()))
    # fsync at all. Off only for benchmarks that measure the cost of it.
    fsync: bool = True


@dataclass(frozen=True)
class Condition:
    """One condition of a set rule.

    Exactly one of ``header`` (a message header name) or ``meta`` (a metadata
    field name, see spamtrap.message.META_FIELDS) is set; ``regex`` is
    searched in every value of it (case-insensitive).
    """

    regex: re.Pattern[str]
    header: str | None = field(default=None, metadata=rule(_header_name))
    meta: str | None = field(default=None, metadata=rule(_meta_field))


@dataclass(frozen=True)
class RotateConfig:
    max_bytes: int = field(default=64 * MIB, metadata=rule(_size()))  # compressed bytes written
    max_messages: int = field(default=100_000, metadata=rule(_integer(1)))
    max_age: float = field(default=3600.0, metadata=rule(_duration(positive=True)))


@dataclass(frozen=True)
class WebhookConfig:
    url: str = field(metadata=rule(_http_url))
    # HMAC-SHA256 key: the body's signature is sent in X-Spamtrap-Signature.
    secret: str | None = field(default=None, metadata=rule(_nonempty))


@dataclass(frozen=True)
class SetNotifyConfig:
    # List addresses that get one machine-readable mail per stored bundle.
    mail: list[str] = field(default_factory=list, metadata=rule(_address))
    webhooks: list[WebhookConfig] = field(default_factory=list)


@dataclass(frozen=True)
class SetConfig:
    name: str
    # Every condition must hold (AND). Empty: the set takes everything.
    match: list[Condition] = field(default_factory=list)
    # A message matching any of these is left out.
    exclude: list[Condition] = field(default_factory=list)
    rotate: RotateConfig = field(default_factory=RotateConfig)
    # N open files per period; each message goes to one chosen at random.
    shards: int = field(default=1, metadata=rule(_integer(1)))
    # Bearer token for listing this set over HTTP (None: listing disabled).
    token: str | None = field(default=None, metadata=rule(_nonempty))
    # When the previous bundle's upload is still running at the next
    # rotation: "skip" the new bundle (counted; there is always more spam)
    # or "queue" it, keeping at most `upload_queue` waiting (oldest shed).
    upload_policy: str = field(default="skip", metadata=rule(_choice("skip", "queue")))
    upload_queue: int = field(default=10, metadata=rule(_integer(1)))
    # A private set is never announced on another set's channels, and its
    # bundles are never listed in other sets' feeds.
    private: bool = False
    # Rewrite every trap address (trap domains, addresses, feed addresses and
    # the message's own RCPT TO) in headers, metadata and decoded text bodies,
    # keeping length and structure: letters become x, digits 1.
    redact_trap_addresses: bool = False
    # Drop exact copies (same body hash, volatile headers ignored) seen in
    # this set within the window (0 = off). Counted.
    dedup_window: float = field(default=0.0, metadata=rule(_duration()))
    # At most this many messages of one campaign (X-Spamtrap-Campaign) in
    # one bundle; the rest are left out of the set and counted as sampled
    # out (0 = off). Needs campaigns.enabled.
    per_campaign_cap: int = field(default=0, metadata=rule(_integer(0)))
    notify: SetNotifyConfig = field(default_factory=SetNotifyConfig)
    # "unix": a message sent with CRLF throughout is stored with LF and the
    # metadata uses LF (what mutt, formail and grep expect); other messages
    # are stored as sent. "wire": the bytes as sent, CRLF metadata.
    line_endings: str = field(default="unix", metadata=rule(_choice(*LINE_ENDINGS)))


@dataclass(frozen=True)
class CampaignConfig:
    """Campaign ids for near-copies (spamtrap.work.campaign, docs/campaigns.md)."""

    # Give every kept message X-Spamtrap-Campaign, the id shared by the
    # near-copies of one spam run. Costs some tens of µs per message.
    enabled: bool = True
    # A campaign not seen for this long is forgotten: its next message
    # starts a campaign again (with the same id if it reads the same).
    window: float = field(default=86400.0, metadata=rule(_duration(positive=True)))
    # Campaigns remembered at most (2 to 4 KiB each); beyond it the least
    # recently seen is forgotten.
    max_campaigns: int = field(default=50_000, metadata=rule(_integer(1)))


@dataclass(frozen=True)
class RetentionConfig:
    """How long the local store keeps bundles (S3: the bucket's lifecycle
    rules instead, docs/s3.md). Oldest first, each with its index and
    manifest; every deletion is counted."""

    # Bundles opened longer ago than this are deleted. None: kept forever.
    max_age: float | None = field(default=None, metadata=rule(_duration(positive=True)))
    # The store's disk use (bundles, indexes, manifests) never exceeds this:
    # the oldest bundles go to make room. None: no bound.
    max_bytes: int | None = field(default=None, metadata=rule(_size()))


@dataclass(frozen=True)
class StoreConfig:
    # file:///path or s3://bucket/prefix. None: DATA/bundles.
    url: str | None = field(default=None, metadata=rule(_store_url))
    # S3: endpoint of an S3-compatible server (else AWS_ENDPOINT_URL_S3 /
    # AWS_ENDPOINT_URL, else AWS), region (else AWS_REGION/AWS_DEFAULT_REGION),
    # and path-style addressing (needed by most S3-compatible servers).
    endpoint: str | None = field(default=None, metadata=rule(_http_url))
    region: str | None = field(default=None, metadata=rule(_nonempty))
    path_style: bool = True
    # Base URL consumers download objects from (public read by key), e.g.
    # https://traps.example.org/bucket. None: derived from endpoint/bucket.
    public_url: str | None = field(default=None, metadata=rule(_base_url))
    # Uploads: parts of this size above it (multipart), parallel uploads,
    # and retries with exponential backoff and jitter.
    multipart_threshold: int = field(default=16 * MIB, metadata=rule(_size(5 * MIB)))
    max_concurrency: int = field(default=2, metadata=rule(_integer(1)))
    retry_initial: float = field(default=1.0, metadata=rule(_duration(positive=True)))
    retry_max: float = field(default=300.0, metadata=rule(_duration(positive=True)))
    # Finished bundles waiting for upload (an outage); oldest shed beyond it.
    backlog_bytes: int = field(default=10 * GIB, metadata=rule(_size()))
    # Local store only: delete the oldest bundles by age and disk use.
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass(frozen=True)
class RelayConfig:
    """The SMTP relay notification mail is sent through."""

    host: str = field(default="localhost", metadata=rule(_hostname))
    port: int = field(default=25, metadata=rule(_port))
    starttls: bool = False
    username: str | None = field(default=None, metadata=rule(_nonempty))
    password: str | None = field(default=None, metadata=rule(_nonempty))
    sender: str = field(default="spamtrap@localhost", metadata=rule(_address))
    retry_max: float = field(default=3600.0, metadata=rule(_duration(positive=True)))


@dataclass(frozen=True)
class QueueConfig:
    """The shared Redis Streams work queue (scaled out: listeners and
    workers on different processes or machines). See docs/scaling.md."""

    # redis://[user:password@]host:port/db, or rediss://... for TLS.
    # None: no queue; the node's own spool feeds its own filter workers.
    url: str | None = field(default=None, metadata=rule(parse_redis_url))
    # ACL user and password (they override any in the URL). password_file
    # keeps the secret out of the config; its first line is the password.
    username: str | None = field(default=None, metadata=rule(_nonempty))
    password: str | None = field(default=None, metadata=rule(_nonempty))
    password_file: str | None = field(default=None, metadata=rule(_nonempty))
    # rediss:// only: CA bundle that signed the server's certificate (else
    # the system's), and a client certificate if Redis asks for one.
    ca_file: str | None = field(default=None, metadata=rule(_nonempty))
    cert_file: str | None = field(default=None, metadata=rule(_nonempty))
    key_file: str | None = field(default=None, metadata=rule(_nonempty))
    # The stream and its one consumer group, shared by every node.
    stream: str = field(default="spamtrap", metadata=rule(_nonempty))
    group: str = field(default="spamtrap", metadata=rule(_nonempty))
    # The stream holds at most about this many unprocessed messages; beyond
    # it the oldest are trimmed (MAXLEN ~) and counted as shed. 0 = unbounded.
    maxlen: int = field(default=1_000_000, metadata=rule(_integer(0)))
    # A listener that cannot reach Redis: "spool" keeps answering 250 from
    # its own durable spool and forwards the backlog once Redis is back;
    # "tempfail" answers 451 so senders retry (another MX, or later).
    on_unreachable: str = field(default="spool", metadata=rule(_choice("spool", "tempfail")))
    # Seconds a Redis call may take before Redis counts as unreachable.
    timeout: float = field(default=5.0, metadata=rule(_duration(positive=True)))
    # Seconds between attempts to reach Redis again while it is down.
    retry_interval: float = field(default=1.0, metadata=rule(_duration(positive=True)))
    # A message a worker took and has not finished for this long is taken
    # over by another worker (XAUTOCLAIM, tried every claim_idle/2). Live
    # workers refresh the messages they hold every claim_idle/3.
    claim_idle: float = field(default=60.0, metadata=rule(_duration(positive=True)))
    # Messages per XADD pipeline, per XREADGROUP, per claim.
    batch: int = field(default=256, metadata=rule(_integer(1)))
    # Before answering 250, wait until this many replicas have the message
    # too (Redis WAIT). 0 = Redis's own acknowledgement is enough.
    replicas: int = field(default=0, metadata=rule(_integer(0)))
    # Redis connections (and the threads that use them) per process.
    connections: int = field(default=4, metadata=rule(_integer(2)))


@dataclass(frozen=True)
class Config:
    node: str = field(
        default_factory=lambda: socket.gethostname().split(".")[0], metadata=rule(_node_name)
    )
    data_dir: str = field(default="./spamtrap-data", metadata=rule(_nonempty))
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    traps: TrapConfig = field(default_factory=TrapConfig)
    feeds: list[FeedConfig] = field(default_factory=list)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sets: list[SetConfig] = field(
        default_factory=list, metadata=rule(keyed_by="name", nonempty=True)
    )
    store: StoreConfig = field(default_factory=StoreConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    campaigns: CampaignConfig = field(default_factory=CampaignConfig)
    # What this process does: "all" (SMTP intake and filter workers),
    # "listener" (intake only, into the queue) or "worker" (filters only,
    # from the queue). listener and worker need queue.url.
    role: str = field(default="all", metadata=rule(_role))
    queue: QueueConfig = field(default_factory=QueueConfig)
    # Per-message outputs (reporting, forwarding, a local command), each
    # with its own durable queue: name -> {type, sets, ...}. See
    # docs/outputs.md. None by default.
    outputs: list[OutputConfig] = field(
        default_factory=list, metadata=rule(keyed_by="name", kind_of=output_kind)
    )


def default_config() -> Config:
    """The embedded default: a catch-all trap, one set ``all``."""
    return Config(traps=TrapConfig(catch_all=True), sets=[SetConfig(name="all")])
