"""A spamtrap cluster of real processes on loopback, for fault tests and benchmarks.

One redis-server (AOF on, appendfsync always) carries the work queue, one
SeaweedFS is the shared S3 store, and every node is a ``twistd -n spamtrap``
process with its own role, --node name, data directory and loopback address
(127.0.0.2, 127.0.0.3, ...). A node can reach Redis through a FaultProxy, so
a test can cut it off.

Besides the cluster, this module has what a fault run needs around it:

- :class:`LoadGenerator` streams unique messages across the listeners from
  several SMTP client threads. A 4xx or a broken connection is retried like a
  real MTA would (a little later, at the next listener); only ids answered
  250 count as accepted.
- :func:`read_store` reads back every committed bundle from the bucket and
  counts the copies of each ``X-Spamtrap-Id``.
- :func:`make_report` compares the two: missing ids, duplicates, recovery
  times, as a JSON-ready dict.
- :func:`fault_script` is issue 6's fault run: stream, kill a worker with
  SIGKILL, kill and restart Redis, settle, stop, compare.

Nothing here depends on pytest fixtures, so a benchmark can import it; only
the helpers' require_binary() (via RedisServer) may skip or fail a test.
Real processes are polled with deadlines: there is no clock to inject across
a fork.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spamtrap.bundle.mbox import MboxReader
from spamtrap.message import Envelope
from spamtrap.work.queue_link import format_id, parse_id
from tests.support import poll
from tests.support.faultproxy import FaultProxy
from tests.support.node import Node, RawSMTP, SMTPError, free_port
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedFS

STREAM = "spamtrap"  # the queue's default stream and group
GROUP = "spamtrap"
CLEAN_EXIT = (0, -signal.SIGTERM)  # twistd re-raises SIGTERM after a clean stop
ROLES_WITH_SMTP = ("listener", "all")
_ID_HEADER = re.compile(rb"^X-Spamtrap-Id: (\S+)\r?$", re.M)
_LOAD_MESSAGE_ID = re.compile(rb"^Message-Id: <([A-Za-z0-9]+\.\d+)@load\.spamtrap\.test>", re.M)


@dataclass
class Settings:
    """Test-sized queue and bundle settings: faults recover in seconds."""

    claim_idle: float = 5.0
    timeout: float = 1.0
    retry_interval: float = 0.5
    rotate_age: float = 2.0
    batch: int = 256
    connections: int = 4
    filter_workers: int = 2


@dataclass
class Held:
    """A worker's pending entries in Redis."""

    entries: int
    min_idle: float | None  # seconds since the freshest was delivered or refreshed
    message_ids: set[str]  # their X-Spamtrap-Ids


@dataclass
class NodeSpec:
    name: str  # the --node name, also the Redis consumer name of a worker
    role: str  # listener, worker or all
    host: str  # its own loopback address, e.g. 127.0.0.2
    on_unreachable: str = "spool"
    proxied: bool = False  # reaches Redis through a FaultProxy of its own


def node_config(spec: NodeSpec, settings: Settings) -> str:
    # upload_policy queue: the default (skip) drops a bundle on purpose when
    # the previous upload is still running, which a loss count cannot tell
    # from a real loss.
    return f"""\
traps: {{catch_all: true}}
filters: {{workers: {settings.filter_workers}}}
store: {{path_style: true}}
sets:
  all:
    rotate: {{max_age: {settings.rotate_age}s}}
    upload_policy: queue
    upload_queue: 100000
queue:
  on_unreachable: {spec.on_unreachable}
  claim_idle: {settings.claim_idle}s
  timeout: {settings.timeout}s
  retry_interval: {settings.retry_interval}s
  batch: {settings.batch}
  connections: {settings.connections}
"""


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with no AWS_* setting of the machine and ``values`` set;
    Node.start() hands a copy of it to the process it starts."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def wait_until(check: Callable[[], bool], deadline: float, interval: float = 0.1) -> float:
    """Poll ``check`` until it holds; the seconds it took. TimeoutError past ``deadline``."""
    # Polls real processes: there is no clock to inject across a fork.
    return poll.wait_until(check, deadline, interval=interval, retry_on=(OSError, RuntimeError))


class Cluster:
    """Redis, SeaweedFS (given or started) and one spamtrap node per spec."""

    def __init__(
        self,
        work: Path,
        specs: Sequence[NodeSpec],
        s3: SeaweedFS | None = None,
        settings: Settings | None = None,
        prefix: str | None = None,
    ) -> None:
        self.work = work
        self.specs = {s.name: s for s in specs}
        self.settings = settings or Settings()
        self.prefix = prefix or f"cluster-{secrets.token_hex(4)}"
        self._own_s3 = s3 is None
        self.s3 = s3 if s3 is not None else SeaweedFS(work / "seaweedfs")
        self.redis = RedisServer(work / "redis")
        self.proxies: dict[str, FaultProxy] = {}
        self.nodes: dict[str, Node] = {}
        self.exit_codes: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Cluster:
        try:
            self.redis.start()
            if self._own_s3:
                self.s3.start()
            for spec in self.specs.values():
                self.start_node(spec.name)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, name: str) -> Node:
        spec = self.specs[name]
        url = self.redis.url
        if spec.proxied:
            proxy = self.proxies.get(name)
            if proxy is None:
                proxy = FaultProxy(("127.0.0.1", self.redis.port)).start()
                self.proxies[name] = proxy
            url = f"redis://127.0.0.1:{proxy.port}/0"
        data = self.work / "nodes" / name
        data.mkdir(parents=True, exist_ok=True)
        config = data / "spamtrap.yaml"
        config.write_text(node_config(spec, self.settings))
        node = Node(
            data,
            config=config,
            host=spec.host,
            smtp_port=free_port(spec.host),
            http_port=free_port(spec.host),
            extra=["--node", name, "--role", spec.role, "--queue", url,
                   "--store", f"s3://{self.s3.bucket}/{self.prefix}"],
        )  # fmt: skip
        self.nodes[name] = node
        with _environ(self.aws_env()):
            node.start()
        return node

    def aws_env(self) -> dict[str, str]:
        absent = self.work / "aws-absent"  # no ~/.aws of the machine leaks in
        return {
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_ENDPOINT_URL_S3": self.s3.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(absent / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(absent / "credentials"),
        }

    def alive(self, name: str) -> bool:
        proc = self.nodes[name].proc
        return proc is not None and proc.poll() is None

    def kill(self, name: str) -> None:
        """kill -9: no drain, no last upload, no last ack."""
        proc = self.nodes[name].proc
        assert proc is not None
        proc.kill()
        proc.wait(10)
        self.exit_codes[name] = proc.returncode

    def stop_node(self, name: str, timeout: float = 120) -> int:
        """SIGTERM: the node drains, stores its open bundles and acks."""
        rc = self.nodes[name].stop(signal.SIGTERM, timeout)
        self.exit_codes[name] = rc
        return rc

    def stop(self) -> None:
        """Stop everything that still runs; safe in a finally block."""
        errors: list[BaseException] = []
        for name in self.nodes:
            if self.alive(name):
                try:
                    self.stop_node(name, timeout=60)
                except BaseException as e:  # the others must still be stopped
                    errors.append(e)
        for proxy in self.proxies.values():
            try:
                proxy.close()
            except BaseException as e:
                errors.append(e)
        self.redis.stop()
        if self._own_s3:
            self.s3.stop()
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- looking at it -------------------------------------------------------

    def smtp_targets(self) -> list[tuple[str, int]]:
        return [
            (n.host, n.smtp_port)
            for name, n in self.nodes.items()
            if self.specs[name].role in ROLES_WITH_SMTP
        ]

    def listeners_at_start(self) -> list[str]:
        return [n for n, spec in self.specs.items() if spec.role in ROLES_WITH_SMTP]

    def listeners(self) -> list[str]:
        """The running nodes that take mail."""
        return [
            name
            for name, spec in self.specs.items()
            if spec.role in ROLES_WITH_SMTP and name in self.nodes and self.alive(name)
        ]

    def metrics(self, name: str) -> dict[str, float]:
        status, body = self.nodes[name].http_get("/metrics")
        if status != 200:
            raise RuntimeError(f"{name}: /metrics answered {status}")
        return parse_metrics(body.decode())

    def health(self, name: str) -> dict[str, Any]:
        _, body = self.nodes[name].http_get("/healthz")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def pending(self) -> dict[str, int]:
        """Redis's pending entries, per consumer (the XPENDING summary form)."""
        reply = self.redis.command("XPENDING", STREAM, GROUP)
        return {c.decode(): int(n) for c, n in (reply[3] or [])}

    def held(self, consumer: str, count: int = 100_000) -> Held:
        """What ``consumer`` has pending: XPENDING's extended form, and the
        X-Spamtrap-Id of each entry (read from the stream with XRANGE)."""
        rows = self.redis.command("XPENDING", STREAM, GROUP, "-", "+", count, consumer)
        if not rows:
            return Held(0, None, set())
        wanted = {r[0] for r in rows}
        keys = sorted(parse_id(i) for i in wanted)
        entries = self.redis.command(
            "XRANGE", STREAM, format_id(keys[0]), format_id(keys[-1])
        )  # fmt: skip
        ids = {
            Envelope.from_record(fields[1]).msg_id
            for entry_id, fields in entries
            if entry_id in wanted and fields
        }
        return Held(len(rows), min(int(r[2]) for r in rows) / 1000, ids)

    def stream_length(self) -> int:
        return int(self.redis.command("XLEN", STREAM))

    def forwarded_all(self, name: str) -> bool:
        """Redis answers this listener, and it has forwarded all it spooled."""
        m = self.metrics(name)
        spooled = m.get('spamtrap_queue_unreachable_total{action="spooled"}', 0.0)
        return (
            m.get("spamtrap_queue_up") == 1.0
            and m.get("spamtrap_queue_forwarded_total", 0.0) == spooled
            and m.get("spamtrap_spool_depth", 0.0) == 0.0
        )

    def settled(self) -> bool:
        """Every listener forwarded its backlog, and the stream is empty:
        every message is stored and acknowledged."""
        return all(self.forwarded_all(n) for n in self.listeners()) and self.stream_length() == 0

    def settle(self, deadline: float = 120) -> float:
        return wait_until(self.settled, deadline, interval=0.2)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every running node, listeners first (their spools are
        forwarded while workers still read), then the others."""
        order = sorted(
            (n for n in self.nodes if self.alive(n)),
            key=lambda n: self.specs[n].role != "listener",
        )
        return {name: self.stop_node(name) for name in order}

    def counters(self) -> dict[str, dict[str, float]]:
        """The queue's fault counters of every running node."""
        wanted = {
            "spooled": 'spamtrap_queue_unreachable_total{action="spooled"}',
            "tempfail": 'spamtrap_queue_unreachable_total{action="tempfail"}',
            "forwarded": "spamtrap_queue_forwarded_total",
            "added": "spamtrap_queue_added_total",
            "claimed": 'spamtrap_queue_read_total{how="claimed"}',
            "acked": "spamtrap_queue_acked_total",
        }
        out: dict[str, dict[str, float]] = {}
        for name in self.nodes:
            if self.alive(name):
                m = self.metrics(name)
                row = {k: m.get(metric, 0.0) for k, metric in wanted.items()}
                row["skipped_bundles"] = sum(
                    v for k, v in m.items() if k.startswith("spamtrap_bundles_skipped_total")
                )
                out[name] = row
        return out

    def stored(self) -> StoreContents:
        return read_store(self.s3, self.prefix)


# -- load ----------------------------------------------------------------------


def load_message(tag: str, n: int) -> bytes:
    """Message ``n`` of run ``tag``: unique, plain, no filter discards it."""
    return (
        b"From: sender%d@load.example\r\n"
        b"To: trap@trap.example\r\n"
        b"Subject: cluster load %s %d\r\n"
        b"Message-Id: <%s.%d@load.spamtrap.test>\r\n"
        b"\r\n"
        b"Message %d of run %s.\r\n" % (n, tag.encode(), n, tag.encode(), n, n, tag.encode())
    )


class _RefusedError(Exception):
    """A 4xx or 5xx reply."""

    def __init__(self, code: int, text: bytes) -> None:
        super().__init__(text.decode(errors="replace"))
        self.code = code


@dataclass
class LoadGenerator:
    """Streams ``count`` unique messages over ``threads`` SMTP clients.

    Each client sends up to ``per_connection`` messages on one connection,
    then moves to the next listener. A 4xx or a broken connection closes the
    connection, waits ``retry_delay`` and retries the same message at the
    next listener, until ``deadline`` (then the message counts as given up).
    """

    targets: list[tuple[str, int]]
    count: int
    threads: int = 8
    per_connection: int = 20
    retry_delay: float = 0.2
    deadline: float = 600.0
    pause: float = 0.0  # between messages, per client: a gentler stream
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    accepted: dict[str, str] = field(default_factory=dict)  # queue id -> "tag.number"
    tempfails: int = 0  # 4xx replies
    permanent: int = 0  # 5xx replies: never retried, never accepted
    errors: int = 0  # broken connections
    uncertain: set[int] = field(default_factory=set)  # data sent, no reply seen
    given_up: set[int] = field(default_factory=set)
    started: float = 0.0
    finished: float = 0.0
    last_accept: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._numbers = iter(range(self.count))
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._workers: list[threading.Thread] = []
        self._target_turn = itertools.count()

    def start(self) -> LoadGenerator:
        self.started = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            self._workers.append(t)
            t.start()
        return self

    def stop(self) -> None:
        """Send no new message; the ones in progress finish."""
        self._stop.set()

    def abort(self) -> None:
        """Send no new message and retry none (the cluster is going away)."""
        self._abort.set()
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._workers:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
            if t.is_alive():
                raise TimeoutError("the load generator did not finish in time")
        self.finished = time.monotonic()

    def run(self) -> LoadGenerator:
        self.start()
        self.join()
        return self

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.accepted)

    def wait_accepted(self, n: int, deadline: float) -> None:
        wait_until(lambda: self.done >= n, deadline, interval=0.02)

    def rate(self) -> float:
        """Accepted messages per second, from the start to the last 250."""
        span = self.last_accept - self.started
        return len(self.accepted) / span if span > 0 else 0.0

    def _next_number(self) -> int | None:
        if self._stop.is_set():
            return None
        with self._lock:
            return next(self._numbers, None)

    def _next_target(self) -> tuple[str, int]:
        with self._lock:
            turn = next(self._target_turn)
        return self.targets[turn % len(self.targets)]

    def _client(self) -> None:
        conn: RawSMTP | None = None
        sent_on_conn = 0
        try:
            while (n := self._next_number()) is not None:
                data = load_message(self.tag, n)
                give_up = time.monotonic() + self.deadline
                while True:
                    if conn is None or sent_on_conn >= self.per_connection:
                        if conn is not None:
                            conn.close()
                        conn, sent_on_conn = None, 0
                        try:
                            conn = self._connect()
                        except (OSError, SMTPError, _RefusedError):
                            self._failed(None)
                            if self._retry_or_give_up(n, give_up):
                                continue
                            break
                    outcome = self._send(conn, n, data)
                    sent_on_conn += 1
                    if outcome == "accepted":
                        break
                    # A fresh connection for whatever comes next: this one
                    # may be broken or in the middle of a transaction.
                    _close_quietly(conn)
                    conn = None
                    if outcome == "refused" or not self._retry_or_give_up(n, give_up):
                        break
                if self.pause:
                    # Pacing, not a poll: a real load generator's rate is
                    # real time (bounded by the message count).
                    time.sleep(self.pause)
        finally:
            if conn is not None:
                conn.close()

    def _connect(self) -> RawSMTP:
        host, port = self._next_target()
        conn = RawSMTP(host, port, timeout=30)
        _command(conn, b"EHLO load.example", 250)
        return conn

    def _send(self, conn: RawSMTP, n: int, data: bytes) -> str:
        """One transaction: "accepted", "retry" (a 4xx or a broken
        connection) or "refused" (a 5xx: given up)."""
        dot_sent = False
        try:
            _command(conn, b"MAIL FROM:<sender%d@load.example>" % n, 250)
            _command(conn, b"RCPT TO:<trap@trap.example>", 250)
            _command(conn, b"DATA", 354)
            conn.sock.sendall(data + b".\r\n")  # no line starts with "."
            dot_sent = True
            code, text = conn.reply()
        except _RefusedError as e:
            return self._refused(e, n)
        except (OSError, SMTPError):
            self._failed(n if dot_sent else None)
            return "retry"
        if code == 250:
            msg_id = text.rsplit(b" ", 1)[1].decode()
            with self._lock:
                self.accepted[msg_id] = f"{self.tag}.{n}"
                self.last_accept = time.monotonic()
            return "accepted"
        return self._refused(_RefusedError(code, text), n)

    def _refused(self, e: _RefusedError, n: int) -> str:
        with self._lock:
            if 400 <= e.code < 500:
                self.tempfails += 1
                return "retry"
            self.permanent += 1
            self.given_up.add(n)
        return "refused"

    def _failed(self, uncertain: int | None) -> None:
        with self._lock:
            self.errors += 1
            if uncertain is not None:
                # The server may have stored it before the connection broke;
                # a real MTA sends it again, and so do we.
                self.uncertain.add(uncertain)

    def _retry_or_give_up(self, n: int, give_up: float) -> bool:
        if time.monotonic() > give_up or self._abort.wait(self.retry_delay):
            with self._lock:
                self.given_up.add(n)
            return False
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.count,
            "accepted": len(self.accepted),
            "tempfails_4xx": self.tempfails,
            "refused_5xx": self.permanent,
            "connection_errors": self.errors,
            "uncertain": len(self.uncertain),
            "given_up": len(self.given_up),
            "seconds": round((self.finished or time.monotonic()) - self.started, 2),
            "messages_per_second": round(self.rate(), 1),
        }


def send_once(host: str, port: int, data: bytes, timeout: float = 30) -> tuple[int, str]:
    """One transaction on a fresh connection: (reply code, the queue id of
    a 250 or else the reply text)."""
    conn = RawSMTP(host, port, timeout=timeout)
    try:
        _command(conn, b"EHLO load.example", 250)
        _command(conn, b"MAIL FROM:<sender@load.example>", 250)
        _command(conn, b"RCPT TO:<trap@trap.example>", 250)
        _command(conn, b"DATA", 354)
        conn.sock.sendall(data + b".\r\n")
        code, text = conn.reply()
    finally:
        conn.close()
    if code == 250:
        return code, text.rsplit(b" ", 1)[1].decode()
    return code, text.decode(errors="replace")


def _command(conn: RawSMTP, line: bytes, expect: int) -> bytes:
    conn.sock.sendall(line + b"\r\n")
    code, text = conn.reply()
    if code != expect:
        raise _RefusedError(code, text)
    return text


def _close_quietly(conn: RawSMTP) -> None:
    try:
        conn.sock.close()
    except OSError:
        pass


# -- reading the store back ------------------------------------------------------


@dataclass
class StoreContents:
    copies: Counter[str] = field(default_factory=Counter)  # X-Spamtrap-Id -> copies stored
    messages: dict[str, set[str]] = field(default_factory=dict)  # id -> "tag.number"s
    bundles: int = 0
    orphans: list[str] = field(default_factory=list)  # bundle objects without a manifest
    bad: list[str] = field(default_factory=list)  # bundles that do not match their manifest


def bundle_ids(raw: bytes) -> list[tuple[str, str | None]]:
    """(X-Spamtrap-Id, "tag.number" of a load message) of every entry of a
    gzipped mboxrd bundle."""
    out: list[tuple[str, str | None]] = []
    for _from_line, message in MboxReader(io.BytesIO(gzip.decompress(raw))):
        found = _ID_HEADER.search(message)
        if found is None:
            raise ValueError("a stored message without X-Spamtrap-Id")
        load = _LOAD_MESSAGE_ID.search(message)
        out.append((found.group(1).decode(), load.group(1).decode() if load else None))
    return out


def read_store(s3: SeaweedFS, prefix: str) -> StoreContents:
    """Every committed bundle under ``prefix``: a bundle counts once its
    manifest (the commit marker, written after it) is there."""
    client = s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix + "/"
    ):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    out = StoreContents()
    for key in sorted(k for k in keys if k.endswith(".mbox.gz")):
        manifest = key[: -len(".mbox.gz")] + ".json"
        if manifest not in keys:
            out.orphans.append(key)
            continue
        raw = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        doc = json.loads(client.get_object(Bucket=s3.bucket, Key=manifest)["Body"].read())
        entries = bundle_ids(raw)
        if doc["sha256"] != hashlib.sha256(raw).hexdigest() or doc["messages"] != len(entries):
            out.bad.append(key)
        out.bundles += 1
        for msg_id, load in entries:
            out.copies[msg_id] += 1
            if load is not None:
                out.messages.setdefault(msg_id, set()).add(load)
    return out


# -- the report -------------------------------------------------------------------


def make_report(
    accepted: dict[str, str],
    stored: StoreContents,
    recovery: dict[str, float | None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What got a 250 (queue id -> "tag.number") vs what was stored. Lists
    are sorted; ``summary()`` leaves them out."""
    missing = sorted(set(accepted) - set(stored.copies))
    # Stored ids nobody saw a 250 for: a reply lost on a broken connection.
    unexpected = sorted(set(stored.copies) - set(accepted))
    dups = {i: c for i, c in stored.copies.items() if c > 1}
    extra_copies = sum(c - 1 for c in dups.values())
    # One id, one message: copies of an id must all be the message it was given to.
    mismatched = sorted(
        i for i, msgs in stored.messages.items() if i in accepted and msgs != {accepted[i]}
    )
    # A message stored under two ids is a duplicate nobody can spot: only
    # a sender's retry after a lost reply may cause one.
    ids_of: dict[str, set[str]] = {}
    for i, msgs in stored.messages.items():
        for m in msgs:
            ids_of.setdefault(m, set()).add(i)
    unmarked = sorted(m for m, ids in ids_of.items() if len(ids) > 1)
    return {
        "accepted": len(accepted),
        "stored_ids": len(stored.copies),
        "stored_copies": sum(stored.copies.values()),
        "bundles": stored.bundles,
        "missing_count": len(missing),
        "unexpected_count": len(unexpected),
        "mismatched_count": len(mismatched),
        "unmarked_duplicate_count": len(unmarked),
        "duplicate_ids": len(dups),
        "duplicate_copies": extra_copies,
        "duplicates_per_10000": round(extra_copies * 10000 / len(accepted), 2) if accepted else 0,
        "orphan_bundles": len(stored.orphans),
        "bad_bundles": stored.bad,
        "recovery_seconds": recovery or {},
        **extra,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "unmarked_duplicates": unmarked,
        "duplicates": dict(sorted(dups.items())),
        "accepted_ids": sorted(accepted),
        "stored_id_list": sorted(stored.copies),
    }


_LISTS = (
    "missing",
    "unexpected",
    "mismatched",
    "unmarked_duplicates",
    "duplicates",
    "accepted_ids",
    "stored_id_list",
)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its id lists, for printing."""
    return {k: v for k, v in report.items() if k not in _LISTS}


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")


# -- the fault script --------------------------------------------------------------


class Watch:
    """Times, in a thread of its own, how long after ``since`` a condition first holds."""

    def __init__(self, name: str, check: Callable[[], bool], since: float, deadline: float) -> None:
        self.name = name
        self.seconds: float | None = None
        self.error: str | None = None
        self._check = check
        self._since = since
        self._deadline = deadline
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = self._since + self._deadline
        while not self._cancelled.is_set():
            try:
                if self._check():
                    self.seconds = round(time.monotonic() - self._since, 3)
                    return
            except (OSError, RuntimeError):
                pass  # a server being restarted: ask again
            if time.monotonic() > end:
                self.error = f"{self.name}: not reached in {self._deadline:g}s"
                return
            self._cancelled.wait(0.05)

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.seconds


def fault_script(
    cluster: Cluster,
    messages: int = 20_000,
    threads: int = 8,
    worker: str = "C",
    kill_worker_at: float = 0.2,
    kill_redis_at: float = 0.5,
    redis_down: float = 3.0,
    deadline: float = 600.0,
) -> dict[str, Any]:
    """Stream ``messages`` across the listeners; at ``kill_worker_at`` of
    them kill -9 ``worker`` (for good: another worker must take over its
    entries), at ``kill_redis_at`` kill -9 Redis and start it again
    ``redis_down`` seconds later. Then settle, SIGTERM the nodes and compare
    what got a 250 with what was stored. Recovery times:

    - ``redis_restart``: Redis started again -> every listener reports
      queue_up 1 and has forwarded all it spooled;
    - ``worker_kill``: the kill -> Redis lists no pending entry for the
      dead worker.
    """
    wall = time.monotonic()
    load = LoadGenerator(cluster.smtp_targets(), messages, threads=threads).start()
    facts: dict[str, Any] = {}
    watches: list[Watch] = []
    try:
        load.wait_accepted(int(messages * kill_worker_at), deadline)
        t_kill = time.monotonic()
        cluster.kill(worker)
        held = cluster.held(worker)
        facts["worker_held_at_kill"] = held.entries
        # The freshest entry is claimable claim_idle after its last delivery
        # or refresh: the takeover cannot be over sooner.
        facts["worker_min_idle_at_kill_s"] = held.min_idle
        watches.append(
            Watch("worker_kill", lambda: worker not in cluster.pending(), t_kill, deadline)
        )

        load.wait_accepted(int(messages * kill_redis_at), deadline)
        facts["accepted_at_redis_kill"] = load.done
        t_redis_kill = time.monotonic()
        cluster.redis.kill()
        # Not a poll: the outage itself, a fixed real time the real nodes live through.
        time.sleep(redis_down)
        cluster.redis.start()
        t_restart = time.monotonic()
        facts["redis_down_seconds"] = round(t_restart - t_redis_kill, 2)
        watches.append(
            Watch(
                "redis_restart",
                lambda: all(cluster.forwarded_all(n) for n in cluster.listeners()),
                t_restart,
                deadline,
            )
        )
        load.join(deadline)
        recovery = {w.name: w.result(deadline) for w in watches}
        facts["watch_errors"] = [w.error for w in watches if w.error]
        facts["settle_seconds"] = round(cluster.settle(deadline), 2)
        facts["counters"] = cluster.counters()
    except BaseException:
        load.abort()
        raise
    finally:
        for w in watches:
            w.cancel()
    facts["exit_codes"] = cluster.stop_all()
    facts["left_in_stream"] = cluster.stream_length()
    stored = cluster.stored()
    # Where duplicates may come from: the dead worker's entries (stored by
    # it, never acknowledged, taken over and stored again), or XADDs Redis
    # applied but whose replies the kill lost (so spooled and forwarded
    # again): a listener has one XADD round trip in flight at a time, of up
    # to a batch.
    dups = {i for i, c in stored.copies.items() if c > 1}
    facts["duplicate_ids_held_by_dead_worker"] = len(dups & held.message_ids)
    facts["duplicate_ids_other"] = len(dups - held.message_ids)
    facts["in_flight_bound_at_redis_kill"] = (
        len(cluster.listeners_at_start()) * cluster.settings.batch
    )
    facts["wall_seconds"] = round(time.monotonic() - wall, 1)
    return make_report(load.accepted, stored, recovery, load=load.summary(), **facts)
