"""The configuration's declarations: one dataclass per section.

The dataclasses are the whole configuration as the rest of spamtrap sees it.
Each key is declared once, here: its type, its default, the comment that
documents it and, in ``metadata=rule(...)``, the rule that checks it
(spamtrap.config.rules). A field without a rule is read by its type's
default parser (an int at least 0, a float as a duration). Cross-checks
between keys are in spamtrap.config.checks. etc/spamtrap.yaml and the
README's and operators' guide's key tables are checked against these
declarations by tests/unit/test_config.py.

The loaded config is not frozen yet: tests build configs by assigning to
their attributes.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any

from spamtrap.config.rules import (
    GIB,
    MIB,
    _address,
    _base_url,
    _callable_path,
    _choice,
    _domain,
    _duration,
    _endpoint,
    _extension,
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


@dataclass
class ProxyConfig:
    # PROXY protocol v1/v2 is accepted only from these networks (CIDR). Empty
    # = off. A connection from a trusted network *must* start with a header.
    trusted_networks: list[str] = field(default_factory=list, metadata=rule(_network))


@dataclass
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


@dataclass
class HTTPConfig:
    listen: list[str] = field(
        default_factory=lambda: ["tcp:8025"], metadata=rule(_endpoint, one_or_many=True)
    )
    # Base URL that consumers use to download bundles (used in notices).
    public_url: str = field(default="http://localhost:8025", metadata=rule(_base_url))


@dataclass
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


@dataclass
class TrapConfig:
    # Any local part at these domains is a trap.
    domains: list[str] = field(default_factory=list, metadata=rule(_domain))
    # Single trap addresses.
    addresses: list[str] = field(default_factory=list, metadata=rule(_address))
    # Regexps matched (search, case-insensitive) against the whole recipient.
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    # Accept every recipient (the embedded default's catch-all trap).
    catch_all: bool = False


@dataclass
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


DANGEROUS_EXTENSIONS = [
    "exe", "scr", "com", "pif", "bat", "cmd", "cpl", "msi", "msp", "dll", "sys",
    "js", "jse", "vbs", "vbe", "wsf", "wsh", "hta", "ps1", "psm1", "reg", "lnk",
    "iso", "img", "vhd", "vhdx", "jar", "apk", "chm", "scf", "url", "inf",
]  # fmt: skip


@dataclass
class VirusConfig:
    """Stage "virus": the fast built-in malware detector."""

    enabled: bool = True
    # Attachment file name extensions that are discarded on sight.
    extensions: list[str] = field(
        default_factory=lambda: list(DANGEROUS_EXTENSIONS), metadata=rule(_extension)
    )
    # Zip archives are opened with these limits, so a zip bomb does no harm.
    max_zip_depth: int = field(default=2, metadata=rule(_integer(0)))
    max_zip_entries: int = field(default=1000, metadata=rule(_integer(1)))
    max_zip_bytes: int = field(default=32 * MIB, metadata=rule(_size()))


@dataclass
class ClamdConfig:
    """Stage "clamd": ClamAV's daemon over its INSTREAM protocol."""

    enabled: bool = False
    # A unix socket path; when unset, host and port are used.
    socket: str | None = field(default=None, metadata=rule(_nonempty))
    host: str = "127.0.0.1"
    port: int = field(default=3310, metadata=rule(_port))
    # Below filters.stage_budget.
    timeout: float = field(default=8.0, metadata=rule(_duration(positive=True)))
    max_concurrency: int = field(default=4, metadata=rule(_integer(1)))
    # What to do with a message when clamd is down or times out.
    on_error: str = field(default="keep", metadata=rule(_choice("keep", "discard")))


@dataclass
class ListRule:
    """A named discard rule: the message is discarded when ``regex`` is
    found in a header (``header:``) or metadata field (``meta:``)."""

    name: str = field(metadata=rule(_name))
    regex: re.Pattern[str]
    header: str | None = field(default=None, metadata=rule(_header_name))
    meta: str | None = field(default=None, metadata=rule(_meta_field))


@dataclass
class ListsConfig:
    """Stage "lists": discard lists for retired trap addresses and ham."""

    rules: list[ListRule] = field(default_factory=list)
    # YAML files holding more rules (a list of {name, regex, header|meta}).
    # They reload on SIGHUP and when they change (checked every interval).
    files: list[str] = field(default_factory=list)
    reload_interval: float = field(default=10.0, metadata=rule(_duration(positive=True)))


@dataclass
class BounceConfig:
    """Stage "bounce": the native bounce and backscatter detector."""

    enabled: bool = True


@dataclass
class SpamdConfig:
    """Stage "spamd": ask a real SpamAssassin, discard on ANY_BOUNCE_MESSAGE."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=783, metadata=rule(_port))
    # Below filters.stage_budget.
    timeout: float = field(default=8.0, metadata=rule(_duration(positive=True)))
    max_concurrency: int = field(default=3, metadata=rule(_integer(1)))
    on_error: str = field(default="keep", metadata=rule(_choice("keep", "discard")))


@dataclass
class CustomStageConfig:
    """An operator's own stage: ``callable`` is "package.module:factory",
    called once with ``options`` (a mapping) to build the stage."""

    name: str
    callable: str = field(metadata=rule(_callable_path))
    options: dict[str, Any] = field(default_factory=dict)


BUILTIN_STAGES = ["size", "virus", "clamd", "feeds", "lists", "bounce", "spamd"]


@dataclass
class FilterConfig:
    # Bounded thread pool for filter stages and bundle writes. 0 = intake
    # only: SMTP still answers 250 into the spool, which sheds its oldest.
    workers: int = field(default=2, metadata=rule(_integer(0)))
    # Stage "size": discard messages above this many bytes.
    max_size: int = field(default=4 * MIB, metadata=rule(_size()))
    # The stages in the order they run: built-in names and custom ones.
    # A built-in stage left out of the list does not run.
    order: list[str] = field(default_factory=lambda: list(BUILTIN_STAGES), metadata=rule(_name))
    # Most seconds one stage may spend on one message; past it the stage's
    # verdict is "error" and the message goes on (it is never lost).
    stage_budget: float = field(default=10.0, metadata=rule(_duration(positive=True)))
    virus: VirusConfig = field(default_factory=VirusConfig)
    clamd: ClamdConfig = field(default_factory=ClamdConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)
    custom: list[CustomStageConfig] = field(default_factory=list, metadata=rule(keyed_by="name"))


@dataclass
class Condition:
    """One condition of a set rule.

    Exactly one of ``header`` (a message header name) or ``meta`` (a metadata
    field name, see spamtrap.message.META_FIELDS) is set; ``regex`` is
    searched in every value of it (case-insensitive).
    """

    regex: re.Pattern[str]
    header: str | None = field(default=None, metadata=rule(_header_name))
    meta: str | None = field(default=None, metadata=rule(_meta_field))


@dataclass
class RotateConfig:
    max_bytes: int = field(default=64 * MIB, metadata=rule(_size()))  # compressed bytes written
    max_messages: int = field(default=100_000, metadata=rule(_integer(1)))
    max_age: float = field(default=3600.0, metadata=rule(_duration(positive=True)))


@dataclass
class WebhookConfig:
    url: str = field(metadata=rule(_http_url))
    # HMAC-SHA256 key: the body's signature is sent in X-Spamtrap-Signature.
    secret: str | None = field(default=None, metadata=rule(_nonempty))


@dataclass
class SetNotifyConfig:
    # List addresses that get one machine-readable mail per stored bundle.
    mail: list[str] = field(default_factory=list, metadata=rule(_address))
    webhooks: list[WebhookConfig] = field(default_factory=list)


@dataclass
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
    notify: SetNotifyConfig = field(default_factory=SetNotifyConfig)
    # "unix": a message sent with CRLF throughout is stored with LF and the
    # metadata uses LF (what mutt, formail and grep expect); other messages
    # are stored as sent. "wire": the bytes as sent, CRLF metadata.
    line_endings: str = field(default="unix", metadata=rule(_choice(*LINE_ENDINGS)))


@dataclass
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


@dataclass
class RelayConfig:
    """The SMTP relay notification mail is sent through."""

    host: str = field(default="localhost", metadata=rule(_hostname))
    port: int = field(default=25, metadata=rule(_port))
    starttls: bool = False
    username: str | None = field(default=None, metadata=rule(_nonempty))
    password: str | None = field(default=None, metadata=rule(_nonempty))
    sender: str = field(default="spamtrap@localhost", metadata=rule(_address))
    retry_max: float = field(default=3600.0, metadata=rule(_duration(positive=True)))


@dataclass
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


@dataclass
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
    # What this process does: "all" (SMTP intake and filter workers),
    # "listener" (intake only, into the queue) or "worker" (filters only,
    # from the queue). listener and worker need queue.url.
    role: str = field(default="all", metadata=rule(_role))
    queue: QueueConfig = field(default_factory=QueueConfig)


def default_config() -> Config:
    """The embedded default: a catch-all trap, one set ``all``."""
    cfg = Config()
    cfg.traps.catch_all = True
    cfg.sets = [SetConfig(name="all")]
    return cfg
