"""The shipped etc/haproxy.cfg in front of two real spamtrap nodes.

The test config is the sample itself with a few substitutions (see
``render``), so a change to the sample is a change to what is tested. The
lines it takes out (chroot, user, group) need root; ``haproxy -c`` checks
the untouched file instead.

Addresses: the client connects to HAProxy from 127.0.0.5, HAProxy connects
to the nodes from 127.0.0.9 (the sample's ``source`` line), and the nodes
trust PROXY headers from 127.0.0.9/32 only. Node.start's readiness probe
comes from 127.0.0.1, an untrusted address, so it is greeted as usual.
"""

from __future__ import annotations

import csv
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.node import (
    REPO,
    Node,
    RawSMTP,
    bundles,
    free_port,
    require_binary,
    split_metadata,
)
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

SAMPLE = REPO / "etc" / "haproxy.cfg"
CLIENT = "127.0.0.5"  # the "bot"
BALANCER = "127.0.0.9"  # where HAProxy connects to the nodes from
CLEAN_EXIT = (0, -signal.SIGTERM)
CHECK_INTERVAL = "200ms"  # instead of the sample's 10s, so checks run during the test
SHOWN = ("status", "check_status", "check_desc", "chkfail", "stot", "wredis")

Check = Callable[[dict[str, dict[str, str]]], bool]


def _sub(pattern: str, repl: str, text: str, count: int = 1) -> str:
    """re.sub that insists the sample still has what the test replaces."""
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, f"etc/haproxy.cfg: {pattern!r} matched {n} times, expected {count}"
    return new


def render(sample: str, listen: int, servers: list[tuple[str, int]], socket_path: Path) -> str:
    text = _sub(r"^(\s*)log /dev/log local0$", r"\1log stdout format raw local0", sample)
    for keyword in ("chroot", "user", "group"):  # need root; `haproxy -c` covers them
        text = _sub(rf"^\s*{keyword} .*\n", "", text)
    text = _sub(r"^(\s*stats socket )/run/haproxy/admin\.sock", rf"\g<1>{socket_path}", text)
    # The sample's descriptor needs (2 x 100000) exceed a test box's limit.
    text = _sub(r"^(\s*)maxconn 100000$", r"\g<1>maxconn 2000", text)
    text = _sub(r"^(\s*)maxconn 99000$", r"\g<1>maxconn 1900", text)
    text = _sub(r"^(\s*)bind .*$", rf"\g<1>bind 127.0.0.1:{listen}", text)
    text = _sub(r"^(\s*)# source 10\.0\.0\.10$", rf"\g<1>source {BALANCER}", text)
    text = _sub(r"\binter 10s\b", f"inter {CHECK_INTERVAL}", text)
    lines = "".join(f"    server {name} 127.0.0.1:{port}\n" for name, port in servers)
    text = _sub(r"^\s*server trap1 .*\n", lines, text)
    return _sub(r"^\s*server trap\d .*\n", "", text, count=2)


class Client(RawSMTP):
    """RawSMTP from a chosen source address, as a bot elsewhere would connect."""

    def __init__(self, source: str, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout, source_address=(source, 0))
        self.buf = b""
        self.expect(220)


@dataclass
class Balancer:
    proc: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    log_path: Path

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the spamtrap backend's servers, by name."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {
            r["svname"]: r
            for r in rows
            if r["pxname"] == "spamtrap" and r["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_for(self, what: str, ok: Check, deadline: float = 20) -> dict[str, dict[str, str]]:
        # Polls a real process: there is no clock to inject across a fork.
        seen: dict[str, dict[str, str]] = {}

        def reached() -> bool:
            nonlocal seen
            seen = {}
            assert self.proc.poll() is None, f"haproxy exited:\n{self.log()}"
            seen = self.servers()
            return ok(seen)

        try:
            wait_until(reached, deadline, what, retry_on=(OSError,))
        except TimeoutError:
            state = {name: {k: s[k] for k in SHOWN} for name, s in seen.items()}
            message = f"haproxy: no {what} in {deadline}s: {state}\n{self.log()}"
            raise AssertionError(message) from None
        return seen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def count(node: Node, name: str) -> float:
    """A counter summed over its labels; it must exist, so that 0 means none."""
    _, body = node.http_get("/metrics")
    assert f"# TYPE {name} counter\n".encode() in body, f"no counter {name}"
    return node.metric(name)


def checks_passed(servers: dict[str, dict[str, str]]) -> bool:
    return len(servers) == 2 and all(s["check_status"] == "L7OK" for s in servers.values())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Balancer, list[Node]]]:
    haproxy = require_binary("haproxy")
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        "traps: {catch_all: true}\n"
        f"smtp: {{proxy_protocol: {{trusted_networks: [{BALANCER}/32]}}}}\n"
    )
    nodes: list[Node] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        for name in ("n1", "n2"):
            # Listed before start(), so that a node that fails to listen is stopped too.
            nodes.append(Node(tmp_path / name, config=config, extra=["--node", name]))
            nodes[-1].start()
        port = free_port()
        # Short: a unix socket path has at most 107 bytes.
        sock = tmp_path / "ha.sock"
        cfg = tmp_path / "haproxy.cfg"
        servers = [(n.data_dir.name, n.smtp_port) for n in nodes]
        cfg.write_text(render(SAMPLE.read_text(), port, servers, sock))
        log_path = tmp_path / "haproxy.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [haproxy, "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT
            )
        balancer = Balancer(proc, port, sock, log_path)
        balancer.wait_for("passing SMTP checks", checks_passed)
        yield balancer, nodes
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.stop()


def send_sessions(port: int, count: int) -> dict[str, tuple[int, bytes]]:
    """``count`` sessions of one message each; queue id -> (client port, body)."""
    sent: dict[str, tuple[int, bytes]] = {}
    for i in range(count):
        c = Client(CLIENT, "127.0.0.1", port)
        client_port = c.sock.getsockname()[1]
        body = b"Subject: through haproxy %d\r\n\r\nbody %d\r\n" % (i, i)
        c.cmd(b"EHLO bot.example", 250)
        sent[c.send(b"bot@spam.example", [b"victim@trap.example"], body)] = (client_port, body)
        c.close()
    return sent


def stored(node: Node) -> dict[str, tuple[bytes, bytes]]:
    """id -> (metadata block, original message) from every bundle of a node."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for path in bundles(node.data_dir):
        for _from_line, msg in read_mbox(str(path)):
            meta, original = split_metadata(msg)
            msg_id = re.search(rb"X-Spamtrap-Id: (\S+)", meta)
            assert msg_id is not None, meta
            out[msg_id.group(1).decode()] = (meta, original)
    return out


def test_sample_config_is_valid_as_shipped() -> None:
    haproxy = require_binary("haproxy")
    # The lines the other tests take out (chroot, user, group, port 25) are checked here.
    r = subprocess.run(
        [haproxy, "-c", "-f", str(SAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Configuration file is valid" in r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr


def test_sessions_spread_over_nodes_with_the_client_address(
    cluster: tuple[Balancer, list[Node]],
) -> None:
    balancer, nodes = cluster
    sent = send_sessions(balancer.port, 12)
    # The queue id ends with the node's name: both nodes took sessions.
    by_node = {
        n.data_dir.name: {i for i in sent if i.endswith("." + n.data_dir.name)} for n in nodes
    }
    assert set().union(*by_node.values()) == set(sent)
    assert all(len(ids) >= 3 for ids in by_node.values()), by_node

    # Let the health checks run on: each one is a connection to every node ...
    before = {n.data_dir.name: n.metric("spamtrap_smtp_connections_total") for n in nodes}
    # Real haproxy and nodes: poll their metrics, with a deadline.
    end = time.monotonic() + 20
    for n in nodes:
        name = n.data_dir.name
        wait_until(
            lambda n=n, name=name: count(n, "spamtrap_smtp_connections_total") >= before[name] + 3,
            max(0.0, end - time.monotonic()),
            f"health checks to reach {name}",
        )
        # ... and none of them left a message, a refusal or a protocol error.
        assert count(n, "spamtrap_messages_accepted_total") == len(by_node[name])
        assert count(n, "spamtrap_messages_rejected_total") == 0
        assert count(n, "spamtrap_smtp_protocol_errors_total") == 0
    servers = balancer.servers()
    assert {s: (r["status"], r["chkfail"]) for s, r in servers.items()} == {
        "n1": ("UP", "0"),
        "n2": ("UP", "0"),
    }

    for n in nodes:
        assert n.stop() in CLEAN_EXIT, n.log()
        log = n.log_path.read_text() if n.log_path else ""
        assert "bad PROXY header" not in log and "Traceback" not in log, log[-3000:]
        got = stored(n)
        name = n.data_dir.name
        assert set(got) == by_node[name]
        for msg_id, (meta, original) in got.items():
            client_port, body = sent[msg_id]
            assert original == body
            # The real client, not HAProxy, as peer; HAProxy as the proxy;
            # the address the client connected to as local.
            assert f"X-Spamtrap-Peer: {CLIENT} {client_port}\n".encode() in meta, meta
            assert re.search(rb"X-Spamtrap-Proxy: 127\.0\.0\.9 \d+\n", meta), meta
            assert f"X-Spamtrap-Local: 127.0.0.1 {balancer.port}\n".encode() in meta, meta
            assert f"X-Spamtrap-Node: {name}\n".encode() in meta
            assert f"[{CLIENT}])".encode() in meta  # the trap-hop Received line


def test_dead_node_sessions_go_to_the_other_node(
    cluster: tuple[Balancer, list[Node]],
) -> None:
    balancer, nodes = cluster
    n1, n2 = nodes
    # Keep HAProxy believing n2 is up, so connections really hit the dead
    # node and must be retried elsewhere (retries + option redispatch).
    balancer.command("disable health spamtrap/n2")
    assert n2.proc is not None
    n2.proc.kill()
    n2.proc.wait()
    sent = send_sessions(balancer.port, 4)
    assert all(i.endswith(".n1") for i in sent), sent
    assert int(balancer.servers()["n2"]["wredis"]) >= 1
    # With checks back on, n2 is taken out of rotation.
    balancer.command("enable health spamtrap/n2")
    servers = balancer.wait_for("n2 DOWN", lambda s: s["n2"]["status"] == "DOWN")
    assert servers["n1"]["status"] == "UP"
    assert count(n1, "spamtrap_smtp_protocol_errors_total") == 0
