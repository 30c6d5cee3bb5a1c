"""Typed configuration.

The dataclasses below are the whole configuration as the rest of spamtrap sees
it. ``load_config`` turns YAML into them; it is strict: unknown keys and bad
values are errors that carry the line number in the file. Config is always
passed in, never global, so two services can run in one test process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import math
import re
import socket
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import yaml

from spamtrap.message import LINE_ENDINGS, META_FIELDS
from spamtrap.regex_safety import compile_safe

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# What one process does (Config.role, twistd spamtrap --role).
ROLES = ("all", "listener", "worker")


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
    # Seconds of silence allowed while no transaction is open (after the
    # greeting, after each reply to DATA): idle sessions hold connection
    # slots. The command timeout still applies once MAIL is accepted.
    idle_before_mail: float = 60.0


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
    # Per client address (IPv6: per /64), counted after any PROXY header;
    # generous for bots behind NAT. 0 = off.
    max_connections_per_ip: int = 200
    # Unfinished DATA held in memory across all sessions; above it a
    # session's DATA goes to a spill file under DATA/spill/<node>/.
    data_memory_budget: int = 64 * MIB
    # One session's DATA larger than this always goes to a spill file.
    data_spill_threshold: int = 1 * MIB
    # On stop, sessions get this long to finish; then 421 and closed.
    stop_grace: float = 10.0
    max_recipients: int = 1000
    # Longest command line accepted; longer input without a line end is cut
    # off with 421 (protects the reactor from unbounded buffers).
    max_command_line: int = 4096
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    proxy_protocol: ProxyConfig = field(default_factory=ProxyConfig)
    # MX relays (CIDR) whose XFORWARD/XCLIENT name the real client; without
    # those, the client is read from the message's Received lines, walking
    # down while the hop is a trusted relay or loopback. Empty = none.
    trusted_relays: list[str] = field(default_factory=list)
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
    # Header fields the donor's systems added, removed before storing: each
    # regexp is matched against a whole header field name. None: the built-in
    # list (spamtrap.filters.feeds.DEFAULT_STRIP).
    strip_headers: list[re.Pattern[str]] | None = None
    # Deprecated: the first N Received lines, whoever added them. 0 = none.
    # Cannot be combined with strip_received_by / strip_received_by_regex.
    strip_received: int = 0
    # The donor's own hosts, as their MTAs name themselves in the "by" part
    # of a Received line (exact, case-insensitive, trailing dot ignored) or
    # as regexps matched against the whole by-host. The donor's lines are
    # removed from the top; the one recording the hand-over from outside,
    # and everything below it, stays (spamtrap.filters.feeds.donor_received).
    strip_received_by: list[str] = field(default_factory=list)
    strip_received_by_regex: list[re.Pattern[str]] = field(default_factory=list)
    # Networks of the donor's own hosts: a hop from one of these (or from
    # loopback) into a donor host is the donor's, not the spam's entry.
    donor_networks: list[str] = field(default_factory=list)
    # The donor forwards spam as attachments: store every attached
    # message/rfc822 part as a message of its own (and not the wrapper).
    extract_attached: bool = False


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
    extensions: list[str] = field(default_factory=lambda: list(DANGEROUS_EXTENSIONS))
    # Zip archives are opened with these limits, so a zip bomb does no harm.
    max_zip_depth: int = 2
    max_zip_entries: int = 1000
    max_zip_bytes: int = 32 * MIB


@dataclass
class ClamdConfig:
    """Stage "clamd": ClamAV's daemon over its INSTREAM protocol."""

    enabled: bool = False
    # A unix socket path; when unset, host and port are used.
    socket: str | None = None
    host: str = "127.0.0.1"
    port: int = 3310
    timeout: float = 8.0  # below filters.stage_budget
    max_concurrency: int = 4
    # What to do with a message when clamd is down or times out.
    on_error: str = "keep"


@dataclass
class ListRule:
    """A named discard rule: the message is discarded when ``regex`` is
    found in a header (``header:``) or metadata field (``meta:``)."""

    name: str
    regex: re.Pattern[str]
    header: str | None = None
    meta: str | None = None


@dataclass
class ListsConfig:
    """Stage "lists": discard lists for retired trap addresses and ham."""

    rules: list[ListRule] = field(default_factory=list)
    # YAML files holding more rules (a list of {name, regex, header|meta}).
    # They reload on SIGHUP and when they change (checked every interval).
    files: list[str] = field(default_factory=list)
    reload_interval: float = 10.0


@dataclass
class BounceConfig:
    """Stage "bounce": the native bounce and backscatter detector."""

    enabled: bool = True


@dataclass
class SpamdConfig:
    """Stage "spamd": ask a real SpamAssassin, discard on ANY_BOUNCE_MESSAGE."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 783
    timeout: float = 8.0  # below filters.stage_budget
    max_concurrency: int = 3
    on_error: str = "keep"


@dataclass
class CustomStageConfig:
    """An operator's own stage: ``callable`` is "package.module:factory",
    called once with ``options`` (a mapping) to build the stage."""

    name: str
    callable: str
    options: dict[str, Any] = field(default_factory=dict)


BUILTIN_STAGES = ["size", "virus", "clamd", "feeds", "lists", "bounce", "spamd"]


@dataclass
class FilterConfig:
    # Bounded thread pool for filter stages and bundle writes. 0 = intake
    # only: SMTP still answers 250 into the spool, which sheds its oldest.
    workers: int = 2
    # Stage "size": discard messages above this many bytes.
    max_size: int = 4 * MIB
    # The stages in the order they run: built-in names and custom ones.
    # A built-in stage left out of the list does not run.
    order: list[str] = field(default_factory=lambda: list(BUILTIN_STAGES))
    # Most seconds one stage may spend on one message; past it the stage's
    # verdict is "error" and the message goes on (it is never lost).
    stage_budget: float = 10.0
    virus: VirusConfig = field(default_factory=VirusConfig)
    clamd: ClamdConfig = field(default_factory=ClamdConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)
    custom: list[CustomStageConfig] = field(default_factory=list)


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
class WebhookConfig:
    url: str
    # HMAC-SHA256 key: the body's signature is sent in X-Spamtrap-Signature.
    secret: str | None = None


@dataclass
class SetNotifyConfig:
    # List addresses that get one machine-readable mail per stored bundle.
    mail: list[str] = field(default_factory=list)
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
    shards: int = 1
    # Bearer token for listing this set over HTTP (None: listing disabled).
    token: str | None = None
    # When the previous bundle's upload is still running at the next
    # rotation: "skip" the new bundle (counted; there is always more spam)
    # or "queue" it, keeping at most `upload_queue` waiting (oldest shed).
    upload_policy: str = "skip"
    upload_queue: int = 10
    # A private set is never announced on another set's channels, and its
    # bundles are never listed in other sets' feeds.
    private: bool = False
    # Rewrite every trap address (trap domains, addresses, feed addresses and
    # the message's own RCPT TO) in headers, metadata and decoded text bodies,
    # keeping length and structure: letters become x, digits 1.
    redact_trap_addresses: bool = False
    # Drop exact copies (same body hash, volatile headers ignored) seen in
    # this set within the window (0 = off). Counted.
    dedup_window: float = 0.0
    notify: SetNotifyConfig = field(default_factory=SetNotifyConfig)
    # "unix": a message sent with CRLF throughout is stored with LF and the
    # metadata uses LF (what mutt, formail and grep expect); other messages
    # are stored as sent. "wire": the bytes as sent, CRLF metadata.
    line_endings: str = "unix"


@dataclass
class StoreConfig:
    # file:///path or s3://bucket/prefix. None: DATA/bundles.
    url: str | None = None
    # S3: endpoint of an S3-compatible server (else AWS_ENDPOINT_URL_S3 /
    # AWS_ENDPOINT_URL, else AWS), region (else AWS_REGION/AWS_DEFAULT_REGION),
    # and path-style addressing (needed by most S3-compatible servers).
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = True
    # Base URL consumers download objects from (public read by key), e.g.
    # https://traps.example.org/bucket. None: derived from endpoint/bucket.
    public_url: str | None = None
    # Uploads: parts of this size above it (multipart), parallel uploads,
    # and retries with exponential backoff and jitter.
    multipart_threshold: int = 16 * MIB
    max_concurrency: int = 2
    retry_initial: float = 1.0
    retry_max: float = 300.0
    # Finished bundles waiting for upload (an outage); oldest shed beyond it.
    backlog_bytes: int = 10 * GIB


@dataclass
class RelayConfig:
    """The SMTP relay notification mail is sent through."""

    host: str = "localhost"
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    sender: str = "spamtrap@localhost"
    retry_max: float = 3600.0


@dataclass
class QueueConfig:
    """The shared Redis Streams work queue (scaled out: listeners and
    workers on different processes or machines). See docs/scaling.md."""

    # redis://[user:password@]host:port/db, or rediss://... for TLS.
    # None: no queue; the node's own spool feeds its own filter workers.
    url: str | None = None
    # ACL user and password (they override any in the URL). password_file
    # keeps the secret out of the config; its first line is the password.
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    # rediss:// only: CA bundle that signed the server's certificate (else
    # the system's), and a client certificate if Redis asks for one.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # The stream and its one consumer group, shared by every node.
    stream: str = "spamtrap"
    group: str = "spamtrap"
    # The stream holds at most about this many unprocessed messages; beyond
    # it the oldest are trimmed (MAXLEN ~) and counted as shed. 0 = unbounded.
    maxlen: int = 1_000_000
    # A listener that cannot reach Redis: "spool" keeps answering 250 from
    # its own durable spool and forwards the backlog once Redis is back;
    # "tempfail" answers 451 so senders retry (another MX, or later).
    on_unreachable: str = "spool"
    # Seconds a Redis call may take before Redis counts as unreachable.
    timeout: float = 5.0
    # Seconds between attempts to reach Redis again while it is down.
    retry_interval: float = 1.0
    # A message a worker took and has not finished for this long is taken
    # over by another worker (XAUTOCLAIM, tried every claim_idle/2). Live
    # workers refresh the messages they hold every claim_idle/3.
    claim_idle: float = 60.0
    # Messages per XADD pipeline, per XREADGROUP, per claim.
    batch: int = 256
    # Before answering 250, wait until this many replicas have the message
    # too (Redis WAIT). 0 = Redis's own acknowledgement is enough.
    replicas: int = 0
    # Redis connections (and the threads that use them) per process.
    connections: int = 4


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
    relay: RelayConfig = field(default_factory=RelayConfig)
    # What this process does: "all" (SMTP intake and filter workers),
    # "listener" (intake only, into the queue) or "worker" (filters only,
    # from the queue). listener and worker need queue.url.
    role: str = "all"
    queue: QueueConfig = field(default_factory=QueueConfig)


def default_config() -> Config:
    """The embedded default: a catch-all trap, one set ``all``."""
    cfg = Config()
    cfg.traps.catch_all = True
    cfg.sets = [SetConfig(name="all")]
    return cfg


# ---------------------------------------------------------------------------
# Loading: YAML text -> the dataclasses above.
#
# The YAML is composed into nodes (which keep their line numbers) and walked
# against the dataclass fields and their type hints. Each leaf is parsed by
# the default parser for its type, or by a per-field rule in _RULES. Every
# problem is collected, so one run of `spamtrap check-config` shows them all.


@dataclass
class ConfigIssue:
    line: int | None  # 1-based; None when the problem has no single place
    path: str  # where in the config, e.g. "sets.private.match[0].regex"
    message: str
    option: str | None = None  # the command-line option the value came from

    def format(self, filename: str) -> str:
        if self.option is not None:
            return f"{self.option}: {self.message}"
        where = filename if self.line is None else f"{filename}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is not valid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[ConfigIssue], filename: str = "<string>") -> None:
        self.errors = errors
        self.filename = filename
        super().__init__("\n".join(issue.format(filename) for issue in errors))


def load_config(path: str, overrides: Sequence[Override] = ()) -> Config:
    """Read and check a YAML config file, with ``overrides`` merged in
    (see merge_overrides). Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([ConfigIssue(None, "", f"cannot read: {e.strerror or e}")], path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([ConfigIssue(line, "", "the file is not UTF-8 text")], path)
    return parse_config(text, path, overrides)


def parse_config(
    text: str, filename: str = "<string>", overrides: Sequence[Override] = ()
) -> Config:
    """Check YAML text, with ``overrides`` merged in, and build a Config.
    Raises ConfigError."""
    walker = _Walker()
    cfg = None
    try:
        root = _compose(text, walker.issues)
        if root is not None:
            merge_overrides(root, overrides)
            cfg = walker.build(Config, root, "")
    except RecursionError:
        # Hostile input (e.g. thousands of nested brackets) must still end
        # as a ConfigError: this is an entry point for bad files.
        walker.issues.append(ConfigIssue(None, "", "the YAML is nested too deeply"))
    if walker.issues or cfg is None:
        walker.issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(walker.issues, filename)
    return typing.cast(Config, cfg)


# The embedded default (twistd spamtrap without --config), as a document
# the command-line overrides are merged into: it parses to default_config().
DEFAULT_DOCUMENT = "traps: {catch_all: true}\n"


@dataclass(frozen=True)
class Override:
    """A command-line option that sets one key, e.g. ``--queue URL`` sets
    ``queue.url``. Merged into the document before the one validation, so
    the option is checked by the key's own rule; its errors name it."""

    option: str  # "--queue"
    path: str  # "queue.url"
    value: str


class _OptionMark(yaml.Mark):
    """Where a merged-in value came from: an option, not a file line."""

    def __init__(self, option: str) -> None:
        super().__init__(option, 0, 0, 0, None, 0)
        self.option = option


def option_of(node: yaml.Node | None) -> str | None:
    """The command-line option ``node`` was merged in from, if any."""
    mark = node.start_mark if node is not None else None
    return mark.option if isinstance(mark, _OptionMark) else None


def merge_overrides(root: yaml.MappingNode, overrides: Sequence[Override]) -> None:
    """Set each override's key in the composed document, replacing what
    the file gives there and adding the sections it lacks. A section that
    is not a mapping in the file is left as it is: its own error is
    reported, and the option waits until the file is fixed."""
    for o in overrides:
        mark = _OptionMark(o.option)
        *sections, key = o.path.split(".")
        node: yaml.Node = root
        for name in [*sections, key]:
            if not isinstance(node, yaml.MappingNode):
                break
            found = _entry(node, name)
            if name == key:
                value = yaml.ScalarNode(_STR_TAG, o.value, mark, mark)
                if found is None:
                    node.value.append((yaml.ScalarNode(_STR_TAG, key, mark, mark), value))
                else:
                    index = [k for k, _ in node.value].index(found[0])
                    node.value[index] = (found[0], value)
            elif found is None or _is_null(found[1]):
                section = yaml.MappingNode(_MAP_TAG, [], mark, mark)
                if found is None:
                    node.value.append((yaml.ScalarNode(_STR_TAG, name, mark, mark), section))
                else:
                    index = [k for k, _ in node.value].index(found[0])
                    node.value[index] = (found[0], section)
                node = section
            else:
                node = found[1]


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"


def _compose(text: str, issues: list[ConfigIssue]) -> yaml.MappingNode | None:
    """The root mapping node, or None with the problem added to ``issues``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"YAML syntax error: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark:
            message += f" ({e.context} from line {e.context_mark.line + 1})"
        issues.append(ConfigIssue(mark.line + 1 if mark else None, "", message))
        return None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        issues.append(ConfigIssue(line, "", str(e).splitlines()[0]))
        return None
    except yaml.YAMLError as e:
        issues.append(ConfigIssue(None, "", f"YAML error: {e}"))
        return None
    if root is None or _is_null(root):
        issues.append(ConfigIssue(None, "", "the file is empty; see etc/spamtrap.yaml"))
        return None
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1
        issues.append(
            ConfigIssue(line, "", f"expected a mapping of sections, got {_node_kind(root)}")
        )
        return None
    return root


# -- sizes and durations -----------------------------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 * GIB}
_DURATION_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w))+\s*", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_INT = 2**63 - 1  # what the OS and file formats downstream can hold


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512", "64KiB", "8MiB", "4M", "10k".

    Units are always binary (k = KiB = 1024), whatever the spelling: a limit
    that is 2% larger than meant harms nobody, an ambiguity table does.
    Raises ValueError.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            if value.strip().startswith("-"):
                raise ValueError(f"must not be negative, got {value!r}")
            raise ValueError(f"not a size: {value!r} (use e.g. 512, 64KiB, 8MiB, 1GiB)")
        exact = Fraction(m[1]) * _SIZE_UNITS[m[2] and m[2].lower()]
        if exact.denominator != 1:
            raise ValueError(f"not a whole number of bytes: {value!r}")
        n = int(exact)
    else:
        raise ValueError(f"expected a size such as 512, 64KiB or 8MiB, got {_describe(value)}")
    if n < 0:
        raise ValueError(f"must not be negative, got {n}")
    if n > _MAX_INT:
        raise ValueError(f"too large: {value!r}")
    return n


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "5m", "1h30m", "2d", "500ms".

    Raises ValueError.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(
                float(n) * _DURATION_UNITS[unit.lower()] for n, unit in _DURATION_PART.findall(text)
            )
        elif text.startswith("-"):
            raise ValueError(f"must not be negative, got {value!r}")
        else:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30, 90s, 5m, 1h, 2d, 500ms)")
    else:
        raise ValueError(f"expected a duration such as 90s, 5m or 1h, got {_describe(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


# -- leaf parsers: a YAML scalar's Python value -> the field's value -----------
#
# Each raises ValueError with a message for the operator. Non-scalar nodes
# arrive as a _Shape, so "expected X, got a list" comes out of the same code.

Parser = Callable[[Any], Any]


class _Shape:
    def __init__(self, kind: str) -> None:
        self.kind = kind


def _describe(value: object) -> str:
    if isinstance(value, _Shape):
        return value.kind
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    return f"a {type(value).__name__}"


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _nonempty(value: object) -> str:
    s = _string(value)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _integer(minimum: int = 0) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if value > _MAX_INT:
            raise ValueError(f"too large: {value}")
        return value

    return parse


def _size(minimum: int = 1) -> Parser:
    def parse(value: object) -> int:
        n = parse_size(value)
        if n < minimum:
            raise ValueError(f"must be at least {minimum} bytes, got {value!r}")
        return n

    return parse


def _duration(positive: bool = False) -> Parser:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be more than 0, got {value!r}")
        return seconds

    return parse


def _regex(value: object) -> re.Pattern[str]:
    s = _string(value)
    try:
        # Also refuses shapes that backtrack catastrophically (docs/stages.md).
        return compile_safe(s, re.IGNORECASE)
    except (re.error, OverflowError, ValueError) as e:
        raise ValueError(f"bad regular expression {s!r}: {e}")
    except RecursionError:
        raise ValueError(f"bad regular expression {s[:40]!r}...: nested too deeply")


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The node name is one dot-separated part of every bundle key, so no dots.
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_LABEL_RE = re.compile(r"[^\s@<>()\[\]\\,;:\"/]+")
_HEADER_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII, no colon
_ENDPOINT_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]*")


def _name(value: object) -> str:
    s = _string(value)
    if not _NAME_RE.fullmatch(s):
        raise ValueError(f"bad name {s!r}: use letters, digits, '_', '.', '-' (not first)")
    return s


def _node_name(value: object) -> str:
    s = _string(value)
    if not _NODE_RE.fullmatch(s):
        raise ValueError(
            f"bad node name {s!r}: use letters, digits, '_', '-' (no dots: it is part of"
            " dot-separated bundle names)"
        )
    return s


def _domain(value: object) -> str:
    s = _string(value).lower().rstrip(".")
    if "@" in s:
        raise ValueError(f"{value!r} is an address, not a domain name")
    if not s or not all(_LABEL_RE.fullmatch(label) for label in s.split(".")):
        raise ValueError(f"not a domain name: {value!r}")
    return s


def _hostname(value: object) -> str:
    _domain(value)
    return _string(value)


def _received_host(value: object) -> str:
    # The by-host of a Received line: a domain name or an address literal
    # ("[192.0.2.1]"), compared without case or trailing dot.
    s = _string(value).strip().lower().rstrip(".")
    if s.startswith("[") and s.endswith("]"):
        try:
            ipaddress.ip_address(s[1:-1].removeprefix("ipv6:"))
        except ValueError:
            raise ValueError(f"not an address literal: {value!r} (e.g. '[192.0.2.1]')")
        return s
    return _domain(s)


def _address(value: object) -> str:
    s = _string(value).lower()
    local, at, domain = s.rpartition("@")
    if not at or not local or any(c.isspace() or c in "<>" for c in local):
        raise ValueError(f"not an address: {value!r} (expected local@domain)")
    try:
        domain = _domain(domain)
    except ValueError:
        raise ValueError(f"not an address: {value!r} (bad domain part)")
    return f"{local}@{domain}"


def _split_endpoint(rest: str) -> list[str]:
    # Twisted's description syntax: ':'-separated, backslash escapes a colon.
    parts: list[str] = []
    current, chars = "", iter(rest)
    for c in chars:
        if c == "\\":
            current += next(chars, "")
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    return [*parts, current]


def _endpoint(value: object) -> str:
    # A full parse needs a reactor (serverFromString), so check the form here
    # and the port of the common TCP kinds; the daemon reports the rest.
    if not isinstance(value, str):
        raise ValueError(f"expected an endpoint such as 'tcp:2525', got {_describe(value)}")
    kind, colon, rest = value.partition(":")
    if not colon or not rest or not _ENDPOINT_TYPE_RE.fullmatch(kind):
        raise ValueError(
            f"not an endpoint description: {value!r} (expected TYPE:ARGS, e.g. 'tcp:2525'"
            " or 'tcp:25:interface=127.0.0.1')"
        )
    if kind.lower() in ("tcp", "tcp6", "ssl"):
        args = _split_endpoint(rest)
        named = dict(a.split("=", 1) for a in args if "=" in a)
        positional = [a for a in args if "=" not in a]
        port = named.get("port", positional[0] if positional else "")
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise ValueError(f"bad port in endpoint {value!r}: expected 0-65535")
    return value


def _network(value: object) -> str:
    s = _string(value)
    try:
        return str(ipaddress.ip_network(s))
    except ValueError as e:
        raise ValueError(f"not a network (CIDR): {e}")


def _http_url(value: object) -> str:
    s = _string(value)
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s


def _base_url(value: object) -> str:
    # A public URL is a base that keys are appended to (URL/bundles/<key>,
    # URL/<prefix>/<key>): a query, a fragment or a space would break them.
    s = _http_url(value)
    parts = urlsplit(s)
    if parts.query or parts.fragment or "?" in s or "#" in s:
        raise ValueError(f"a base URL takes no query or fragment, got {s!r}")
    if not s.isprintable() or any(c.isspace() for c in s):
        raise ValueError(f"a base URL takes no spaces or control characters, got {s!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {s!r}")
    return s


def parse_redis_url(value: object) -> str:
    text = _nonempty(value)
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://host[:port][/db] or rediss://..., got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database in {text!r} must be a number")
    return text


def _store_url(value: object) -> str:
    s = _string(value)
    parts = urlsplit(s)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path[:1] == "/":
        if parts.query or parts.fragment:
            raise ValueError(f"a file URL takes no query or fragment, got {s!r}")
        return s
    if parts.scheme == "s3" and parts.netloc and not any(c.isspace() for c in s):
        return s
    raise ValueError(f"expected file:///absolute/path or s3://bucket/prefix, got {s!r}")


def _header_name(value: object) -> str:
    s = _string(value)
    if not _HEADER_RE.fullmatch(s):
        raise ValueError(f"not a header field name: {s!r} (no colon, no spaces)")
    return s


_OWN_META_RE = re.compile(r"x_[a-z0-9_]+")


def _meta_field(value: object) -> str:
    s = _string(value)
    # x_ names are added by stages (the operator's own, or feeds' x_stripped).
    if s not in META_FIELDS and not _OWN_META_RE.fullmatch(s):
        raise ValueError(_unknown("metadata field", s, list(META_FIELDS)))
    return s


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        s = _string(value)
        if s not in choices:
            raise ValueError(_unknown("value", s, list(choices)))
        return s

    return parse


def _role(value: object) -> str:
    s = _string(value)
    if s not in ROLES:
        close = difflib.get_close_matches(s, ROLES, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown role {s!r}: takes one of {', '.join(ROLES)}{hint}")
    return s


def _extension(value: object) -> str:
    s = _string(value).strip().lower().lstrip(".")
    if not s or "." in s or "/" in s:
        raise ValueError(f"not a file name extension: {value!r} (e.g. 'exe')")
    return s


_CALLABLE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _callable_path(value: object) -> str:
    s = _string(value)
    if not _CALLABLE_RE.fullmatch(s):
        raise ValueError(f"expected 'package.module:callable', got {s!r}")
    return s


def _port(value: object) -> int:
    n: int = _integer(1)(value)
    if n > 65535:
        raise ValueError(f"not a port: {n}")
    return n


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} {name!r}; did you mean {close[0]!r}?"
    return f"unknown {what} {name!r} (known: {', '.join(known)})"


# -- the schema: defaults by type, rules by field ----------------------------


@dataclass(frozen=True)
class _Rule:
    parse: Parser | None = None  # for a list field: applied to each item
    one_or_many: bool = False  # a single string is a list of one
    keyed_by: str | None = None  # a list written as a mapping: key -> this field
    nonempty: bool = False


_DEFAULT_PARSERS: dict[Any, Parser] = {
    str: _string,
    bool: _boolean,
    int: _integer(0),
    float: _duration(),  # every float in the config is a duration
    re.Pattern: _regex,
}

_RULES: dict[tuple[type, str], _Rule] = {
    (Config, "node"): _Rule(_node_name),
    (Config, "data_dir"): _Rule(_nonempty),
    (Config, "sets"): _Rule(keyed_by="name", nonempty=True),
    (SMTPConfig, "listen"): _Rule(_endpoint, one_or_many=True),
    (SMTPConfig, "hostname"): _Rule(_hostname),
    (SMTPConfig, "max_message_size"): _Rule(_size()),
    (SMTPConfig, "max_connections"): _Rule(_integer(1)),
    (SMTPConfig, "max_recipients"): _Rule(_integer(1)),
    # RFC 5321 4.5.3.1.4: a command line may be 512 octets; never cut below.
    (SMTPConfig, "max_command_line"): _Rule(_size(512)),
    (TimeoutConfig, "command"): _Rule(_duration(positive=True)),
    (TimeoutConfig, "data"): _Rule(_duration(positive=True)),
    (TimeoutConfig, "session"): _Rule(_duration(positive=True)),
    (TimeoutConfig, "idle_before_mail"): _Rule(_duration(positive=True)),
    (SMTPConfig, "data_memory_budget"): _Rule(_size(MIB)),
    (SMTPConfig, "data_spill_threshold"): _Rule(_size(64 * 1024)),
    (SMTPConfig, "stop_grace"): _Rule(_duration()),
    (ProxyConfig, "trusted_networks"): _Rule(_network),
    (SMTPConfig, "trusted_relays"): _Rule(_network),
    (HTTPConfig, "listen"): _Rule(_endpoint, one_or_many=True),
    (HTTPConfig, "public_url"): _Rule(_base_url),
    (FeedConfig, "id"): _Rule(_name),
    (FeedConfig, "address"): _Rule(_address),
    (TrapConfig, "domains"): _Rule(_domain),
    (TrapConfig, "addresses"): _Rule(_address),
    (SpoolConfig, "max_bytes"): _Rule(_size()),
    (SpoolConfig, "max_messages"): _Rule(_integer(1)),
    (SpoolConfig, "max_age"): _Rule(_duration(positive=True)),
    (SpoolConfig, "segment_bytes"): _Rule(_size()),
    (FilterConfig, "workers"): _Rule(_integer(0)),
    (FilterConfig, "max_size"): _Rule(_size()),
    (Condition, "header"): _Rule(_header_name),
    (Condition, "meta"): _Rule(_meta_field),
    (RotateConfig, "max_bytes"): _Rule(_size()),
    (RotateConfig, "max_messages"): _Rule(_integer(1)),
    (RotateConfig, "max_age"): _Rule(_duration(positive=True)),
    (SetConfig, "shards"): _Rule(_integer(1)),
    (SetConfig, "token"): _Rule(_nonempty),
    (StoreConfig, "url"): _Rule(_store_url),
    (StoreConfig, "endpoint"): _Rule(_http_url),
    (StoreConfig, "region"): _Rule(_nonempty),
    (StoreConfig, "public_url"): _Rule(_base_url),
    (StoreConfig, "multipart_threshold"): _Rule(_size(5 * MIB)),
    (StoreConfig, "max_concurrency"): _Rule(_integer(1)),
    (StoreConfig, "retry_initial"): _Rule(_duration(positive=True)),
    (StoreConfig, "retry_max"): _Rule(_duration(positive=True)),
    (StoreConfig, "backlog_bytes"): _Rule(_size()),
    (SetConfig, "upload_policy"): _Rule(_choice("skip", "queue")),
    (SetConfig, "upload_queue"): _Rule(_integer(1)),
    (SetConfig, "dedup_window"): _Rule(_duration()),
    (SetConfig, "line_endings"): _Rule(_choice(*LINE_ENDINGS)),
    (SetNotifyConfig, "mail"): _Rule(_address),
    (WebhookConfig, "url"): _Rule(_http_url),
    (WebhookConfig, "secret"): _Rule(_nonempty),
    (RelayConfig, "host"): _Rule(_hostname),
    (RelayConfig, "port"): _Rule(_port),
    (RelayConfig, "username"): _Rule(_nonempty),
    (RelayConfig, "password"): _Rule(_nonempty),
    (RelayConfig, "sender"): _Rule(_address),
    (RelayConfig, "retry_max"): _Rule(_duration(positive=True)),
    (FeedConfig, "strip_received"): _Rule(_integer(0)),
    (FeedConfig, "strip_received_by"): _Rule(_received_host, one_or_many=True),
    (FeedConfig, "strip_received_by_regex"): _Rule(_regex, one_or_many=True),
    (FeedConfig, "donor_networks"): _Rule(_network, one_or_many=True),
    (FilterConfig, "order"): _Rule(_name),
    (FilterConfig, "stage_budget"): _Rule(_duration(positive=True)),
    (FilterConfig, "custom"): _Rule(keyed_by="name"),
    (VirusConfig, "extensions"): _Rule(_extension),
    (VirusConfig, "max_zip_depth"): _Rule(_integer(0)),
    (VirusConfig, "max_zip_entries"): _Rule(_integer(1)),
    (VirusConfig, "max_zip_bytes"): _Rule(_size()),
    (ClamdConfig, "socket"): _Rule(_nonempty),
    (ClamdConfig, "port"): _Rule(_port),
    (ClamdConfig, "timeout"): _Rule(_duration(positive=True)),
    (ClamdConfig, "max_concurrency"): _Rule(_integer(1)),
    (ClamdConfig, "on_error"): _Rule(_choice("keep", "discard")),
    (SpamdConfig, "port"): _Rule(_port),
    (SpamdConfig, "timeout"): _Rule(_duration(positive=True)),
    (SpamdConfig, "max_concurrency"): _Rule(_integer(1)),
    (SpamdConfig, "on_error"): _Rule(_choice("keep", "discard")),
    (ListRule, "name"): _Rule(_name),
    (ListRule, "header"): _Rule(_header_name),
    (ListRule, "meta"): _Rule(_meta_field),
    (ListsConfig, "reload_interval"): _Rule(_duration(positive=True)),
    (CustomStageConfig, "callable"): _Rule(_callable_path),
    (Config, "role"): _Rule(_role),
    (QueueConfig, "url"): _Rule(parse_redis_url),
    (QueueConfig, "username"): _Rule(_nonempty),
    (QueueConfig, "password"): _Rule(_nonempty),
    (QueueConfig, "password_file"): _Rule(_nonempty),
    (QueueConfig, "ca_file"): _Rule(_nonempty),
    (QueueConfig, "cert_file"): _Rule(_nonempty),
    (QueueConfig, "key_file"): _Rule(_nonempty),
    (QueueConfig, "stream"): _Rule(_nonempty),
    (QueueConfig, "group"): _Rule(_nonempty),
    (QueueConfig, "maxlen"): _Rule(_integer(0)),
    (QueueConfig, "on_unreachable"): _Rule(_choice("spool", "tempfail")),
    (QueueConfig, "timeout"): _Rule(_duration(positive=True)),
    (QueueConfig, "retry_interval"): _Rule(_duration(positive=True)),
    (QueueConfig, "claim_idle"): _Rule(_duration(positive=True)),
    (QueueConfig, "batch"): _Rule(_integer(1)),
    (QueueConfig, "replicas"): _Rule(_integer(0)),
    (QueueConfig, "connections"): _Rule(_integer(2)),
}

_NO_RULE = _Rule()
_BAD: Any = object()  # a value that failed; the error is already recorded


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


def _entry(node: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key node, value node) of ``key`` in a mapping node, if present."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Walker:
    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.unknown_keys: list[str] = []  # their paths
        # id(built object) -> (its mapping node, its path), for cross-checks
        self.origin: dict[int, tuple[yaml.Node, str]] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        option = option_of(node)
        line = node.start_mark.line + 1 if node is not None and option is None else None
        self.issues.append(ConfigIssue(line, path, message, option))

    def clean(self, path: str) -> bool:
        """No problem was found at or below ``path``.

        Cross-checks run only on clean parts: a value that failed is left out,
        and checking without it would report mistakes the operator never made.
        """
        return not any(
            i.path == path or i.path.startswith((path + ".", path + "[")) for i in self.issues
        )

    def pairs(
        self, node: yaml.MappingNode, path: str, what: str = "key"
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """A mapping's entries, reporting duplicate and non-name keys.

        YAML itself lets a later duplicate key silently win; a typo'd copy of
        a section would then replace the real one without a word.
        """
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, path, "merge keys (<<) are not supported")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, path, f"a key must be a name, got {_node_kind(key_node)}")
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                self.error(
                    key_node,
                    _join(path, key),
                    f"duplicate {what} {key!r} (first on line {seen[key]})",
                )
                continue
            seen[key] = line
            yield key, key_node, value_node

    def build(
        self, cls: type, node: yaml.Node, path: str, preset: dict[str, Any] | None = None
    ) -> Any:
        """A dataclass instance from a mapping node (null: all defaults)."""
        preset = preset or {}
        if not isinstance(node, yaml.MappingNode) and not _is_null(node):
            self.error(node, path, f"expected a mapping, got {_node_kind(node)}")
            return _BAD
        hints = _type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in preset}
        values = dict(preset)
        given = set()
        entries = self.pairs(node, path) if isinstance(node, yaml.MappingNode) else iter(())
        for key, key_node, value_node in entries:
            if key not in fields:
                self.error(key_node, _join(path, key), _unknown("key", key, list(fields)))
                self.unknown_keys.append(_join(path, key))
                continue
            given.add(key)
            rule = _RULES.get((cls, key), _NO_RULE)
            value = self.value(hints[key], value_node, _join(path, key), rule)
            if value is not _BAD:
                values[key] = value
        required = [name for name, f in fields.items() if not _has_default(f)]
        for name in required:
            if name not in given:
                self.error(node, path, f"missing required key {name!r}")
        if any(name not in values for name in required):
            return _BAD  # reported above, or where its value failed
        obj = cls(**values)
        self.origin[id(obj)] = (node, path)
        check = _CHECKS.get(cls)
        if check is not None:
            check(self, obj, node, path)
        return obj

    def value(self, hint: Any, node: yaml.Node, path: str, rule: _Rule) -> Any:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), node, path)
        if origin is list:
            return self.list(typing.get_args(hint)[0], node, path, rule)
        if origin in (types.UnionType, typing.Union):
            if _is_null(node):
                return None
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
            return self.value(hint, node, path, rule)
        if origin is dict:
            return self.mapping(node, path)
        parse = rule.parse or _DEFAULT_PARSERS[typing.get_origin(hint) or hint]
        try:
            return parse(self.scalar(node))
        except ValueError as e:
            self.error(node, path, str(e))
            return _BAD

    def list(self, item_hint: Any, node: yaml.Node, path: str, rule: _Rule) -> Any:
        if rule.keyed_by:
            return self.keyed_list(item_hint, node, path, rule)
        if _is_null(node):
            items: list[tuple[yaml.Node, str]] = []
        elif isinstance(node, yaml.SequenceNode):
            items = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif rule.one_or_many and isinstance(node, yaml.ScalarNode):
            items = [(node, path)]
        else:
            self.error(node, path, f"expected a list, got {_node_kind(node)}")
            return _BAD
        values = [self.value(item_hint, item, item_path, rule) for item, item_path in items]
        return [v for v in values if v is not _BAD]

    def keyed_list(self, item_hint: Any, node: yaml.Node, path: str, rule: _Rule) -> Any:
        # e.g. sets: {name: {options}} -> [SetConfig(name=name, ...)]
        if _is_null(node):
            entries: list[tuple[str, yaml.Node, yaml.Node]] = []
        elif isinstance(node, yaml.MappingNode):
            entries = list(self.pairs(node, path, what="name"))
        else:
            self.error(
                node, path, f"expected a mapping of names to options, got {_node_kind(node)}"
            )
            return _BAD
        assert rule.keyed_by is not None
        result = []
        for key, key_node, value_node in entries:
            item_path = _join(path, key)
            try:
                name = _name(key)
            except ValueError as e:
                self.error(key_node, item_path, str(e))
                continue
            item = self.build(item_hint, value_node, item_path, {rule.keyed_by: name})
            if item is not _BAD:
                result.append(item)
        if rule.nonempty and not entries:
            self.error(node, path, "must not be empty")
        return result

    def mapping(self, node: yaml.Node, path: str) -> Any:
        """Free-form options (a custom stage's): any YAML mapping, as is."""
        if _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {_node_kind(node)}")
            return _BAD
        for _ in self.pairs(node, path):
            pass  # reports duplicate and non-name keys
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError) as e:
            self.error(node, path, f"cannot read options: {e}")
            return _BAD

    def scalar(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return _Shape(_node_kind(node))
        try:
            return self._constructor.construct_object(node)
        # Explicit tags make PyYAML's constructors raise all of these, e.g.
        # "!!bool maybe" is a KeyError and "!!int x" a ValueError.
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError):
            raise ValueError(f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}")


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# -- cross-checks, run on each built object ----------------------------------


def forged_header_problem(header: str) -> str | None:
    """Why a ``header:`` rule may not name one of our X-Spamtrap-* fields.

    Those names in a message's header are the sender's own (our metadata is
    read with ``meta:``): a spammer writing ``X-Spamtrap-Feed: donor1`` must
    not steer its message into a set.
    """
    lower = header.lower()
    if not lower.startswith("x-spamtrap-"):
        return None
    meta = next((k for k, v in META_FIELDS.items() if v.lower() == lower), None)
    if meta is None and lower.startswith("x-spamtrap-x-"):
        meta = "x_" + lower[len("x-spamtrap-x-") :].replace("-", "_")
    hint = f"'meta: {meta}'" if meta else "'meta:' and a metadata field name"
    return (
        f"header {header!r} would read the message's own header fields, which any"
        f" sender can forge; read spamtrap's metadata with {hint} instead"
    )


def _check_forged_header(w: _Walker, header: str | None, node: yaml.Node, path: str) -> None:
    problem = forged_header_problem(header) if header is not None else None
    if problem and w.clean(path):
        found = _entry(node, "header")
        w.error(found[1] if found else node, _join(path, "header"), problem)


def _check_condition(w: _Walker, cond: Condition, node: yaml.Node, path: str) -> None:
    if w.clean(path) and (cond.header is None) == (cond.meta is None):
        which = "both are given" if cond.header else "neither is given"
        w.error(node, path, f"needs exactly one of 'header' or 'meta' ({which})")
    _check_forged_header(w, cond.header, node, path)


def _check_list_rule(w: _Walker, rule: ListRule, node: yaml.Node, path: str) -> None:
    if w.clean(path) and (rule.header is None) == (rule.meta is None):
        which = "both are given" if rule.header else "neither is given"
        w.error(node, path, f"needs exactly one of 'header' or 'meta' ({which})")
    _check_forged_header(w, rule.header, node, path)


def _check_filters(w: _Walker, f: FilterConfig, node: yaml.Node, path: str) -> None:
    known = BUILTIN_STAGES + [c.name for c in f.custom]
    clash = [c.name for c in f.custom if c.name in BUILTIN_STAGES]
    found = _entry(node, "custom")
    for name in clash:
        w.error(
            found[1] if found else node,
            _join(path, f"custom.{name}"),
            f"{name!r} is a built-in stage name; pick another",
        )
    for which in ("clamd", "spamd"):
        service = getattr(f, which)
        if service.enabled and service.timeout >= f.stage_budget:
            found = _entry(node, which)
            w.error(
                found[1] if found else node,
                _join(path, f"{which}.timeout"),
                f"must be below filters.stage_budget ({f.stage_budget:g}s): a slower answer"
                " is ignored as over budget",
            )
    found = _entry(node, "order")
    if found is None:
        f.order = f.order + [c.name for c in f.custom]  # custom stages run last
        return
    seen: set[str] = set()
    for i, name in enumerate(f.order):
        item = found[1].value[i] if isinstance(found[1], yaml.SequenceNode) else found[1]
        if name not in known:
            w.error(item, f"{path}.order[{i}]", _unknown("stage", name, known))
        elif name in seen:
            w.error(item, f"{path}.order[{i}]", f"stage {name!r} is listed twice")
        seen.add(name)


def _check_feed(w: _Walker, feed: FeedConfig, node: yaml.Node, path: str) -> None:
    if not w.clean(path):
        return
    by_host = feed.strip_received_by or feed.strip_received_by_regex
    if feed.strip_received and by_host:
        found = _entry(node, "strip_received")
        w.error(
            found[0] if found else node,
            _join(path, "strip_received"),
            "give strip_received (a count, deprecated) or strip_received_by /"
            " strip_received_by_regex (the donor's hosts), not both",
        )
    if feed.donor_networks and not by_host:
        found = _entry(node, "donor_networks")
        w.error(
            found[0] if found else node,
            _join(path, "donor_networks"),
            "donor_networks needs strip_received_by or strip_received_by_regex"
            " (it says which hops into the donor's hosts are the donor's own)",
        )


def _check_tls(w: _Walker, tls: TLSConfig, node: yaml.Node, path: str) -> None:
    found = _entry(node, "key")
    if tls.key is not None and tls.certificate is None and found:
        w.error(found[1], _join(path, "key"), "a key needs a certificate")


def _check_config(w: _Walker, cfg: Config, node: yaml.Node, path: str) -> None:
    if cfg.role != "all" and cfg.queue.url is None and w.clean("role") and w.clean("queue"):
        found = _entry(node, "role")
        need = (
            "a queue: --queue redis://HOST:PORT"
            if found and option_of(found[1])
            else "queue.url (the Redis the other role reads or writes)"
        )
        w.error(found[1] if found else node, "role", f"role {cfg.role!r} needs {need}")
    if cfg.role == "worker" and cfg.filters.workers == 0 and w.clean("filters"):
        found = _entry(node, "role")
        w.error(
            found[1] if found else node,
            "role",
            "role 'worker' with filters.workers: 0 would process nothing",
        )
    q = cfg.queue
    if q.password is not None and q.password_file is not None and w.clean("queue"):
        found = _entry(node, "queue")
        w.error(found[1] if found else node, "queue", "give password or password_file, not both")
    if _entry(node, "sets") is None:
        cfg.sets = [SetConfig(name="all")]
    for attr in ("id", "address"):
        first: dict[str, int] = {}  # value -> line
        for feed in cfg.feeds:
            feed_node, feed_path = w.origin[id(feed)]
            found = _entry(feed_node, attr)
            value_node = found[1] if found else feed_node
            value = getattr(feed, attr)
            if value in first:
                w.error(
                    value_node,
                    _join(feed_path, attr),
                    f"duplicate feed {attr} {value!r} (first on line {first[value]})",
                )
            else:
                first[value] = value_node.start_mark.line + 1
    t = cfg.traps
    no_trap = not (t.domains or t.addresses or t.patterns or t.catch_all or cfg.feeds)
    # A misspelt top-level key may be the traps or feeds section itself.
    misspelt = any("." not in key for key in w.unknown_keys)
    if no_trap and w.clean("traps") and w.clean("feeds") and not misspelt:
        found = _entry(node, "traps")
        w.error(
            found[0] if found else None,
            "traps",
            "no trap configured: give domains, addresses, patterns or feeds, or catch_all: true",
        )


_CHECKS: dict[type, Callable[[_Walker, Any, yaml.Node, str], None]] = {
    Condition: _check_condition,
    ListRule: _check_list_rule,
    FilterConfig: _check_filters,
    TLSConfig: _check_tls,
    FeedConfig: _check_feed,
    Config: _check_config,
}
