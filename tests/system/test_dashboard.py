"""The live dashboard in a real browser: Debian's headless Chromium.

A real ``twistd spamtrap`` takes a bounded load over loopback SMTP (some
hundreds of messages, some refused) while Chromium loads /dashboard with
its token; the page's script polls data.json and fills the DOM. Chromium
prints the DOM (``--dump-dom``) once during the load and once after it,
and every figure's element (``data-metric``, exact value in ``data-value``)
is checked against the node's own ``/metrics``. Chromium also writes its
network log: every request the page made went to this node, none off-host.
The screenshot is the README's (``SPAMTRAP_SCREENSHOT=docs/dashboard.png``
writes it there).

Chromium resolves no name (``--host-resolver-rules``) and its background
services are off, so the test makes no lookup and no outside connection.
Without ``chromium`` it skips loudly; in CI it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.node import REPO, Node, RawSMTP, SMTPError, require_binary

pytestmark = pytest.mark.needs_debian

TOKEN = "dash-test-token-4f1c9a"
SET_TOKEN = "vault-set-token-77"
PRIVATE_SET = "vaultprivate"
# The last one is sender-controlled markup: the page must show it as text.
HELOS = [f"bot{i}.spam.example" for i in range(4)] + ['<img src=x onerror="alert(1)">']
SESSIONS = 30
PER_SESSION = 10  # 300 messages accepted
REFUSED = 12  # recipients outside the traps: 550, counted as rejected
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    # No name is resolved: a page that asked for a CDN would fail, not leak.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


class Figures(HTMLParser):
    """Every element with a ``data-metric``, with its data-* attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html
        self.found: list[dict[str, str]] = []
        self.text: list[str] = []
        self.tags: set[str] = set()
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        data = {k[5:]: v or "" for k, v in attrs if k.startswith("data-")}
        if "metric" in data:
            self.found.append(data)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def value(self, metric: str, **labels: str) -> float:
        matches = [
            f
            for f in self.found
            if f["metric"] == metric and all(f.get(k) == v for k, v in labels.items())
        ]
        assert len(matches) == 1, (metric, labels, matches)
        return float(matches[0]["value"])

    def status(self) -> str:
        return next(f for f in self.found if f["metric"] == "status").get("value", "")

    def all(self, metric: str, key: str = "key") -> dict[str, float]:
        return {f[key]: float(f["value"]) for f in self.found if f["metric"] == metric and key in f}


def metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, body = node.http_get("/metrics")
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r"([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **match: str
) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all((k, val) in labels for k, val in match.items())
    )


def chromium(binary: str, url: str, out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={out_dir / 'profile'}", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def dump(binary: str, url: str, out_dir: Path, netlog: Path | None = None) -> Figures:
    extra = ["--virtual-time-budget=6000", "--dump-dom"]
    if netlog is not None:
        extra.append(f"--log-net-log={netlog}")
    done = chromium(binary, url, out_dir, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = Figures(done.stdout)
    assert figures.found, done.stdout[:2000]
    return figures


def send_load(node: Node, errors: list[BaseException]) -> None:
    try:
        for session in range(SESSIONS):
            smtp = RawSMTP(node.host, node.smtp_port)
            smtp.cmd(b"EHLO " + HELOS[session % len(HELOS)].encode(), 250)
            for i in range(PER_SESSION):
                rcpts = [b"user%d@trap.example" % i]
                if session % 2 == 0:
                    rcpts.append(b"x@%s.vault.trap.example" % PRIVATE_SET.encode())
                body = b"Subject: load %d.%d\r\n\r\nbody %d\r\n" % (session, i, i)
                smtp.send(b"bot@spam.example", rcpts, body)
            if session < REFUSED:
                smtp.cmd(b"MAIL FROM:<bot@spam.example>", 250)
                smtp.cmd(b"RCPT TO:<someone@elsewhere.example>", 550)
                smtp.cmd(b"RSET", 250)
            smtp.close()
    except (OSError, SMTPError) as e:  # noqa: PERF203 - reported by the test
        errors.append(e)


def write_config(path: Path, node: Node) -> None:
    path.write_text(
        f"""\
traps:
  domains: [trap.example]
  patterns: ['@[a-z]+\\.vault\\.trap\\.example$']
http:
  public_url: http://127.0.0.1:{node.http_port}
  dashboard: token
  dashboard_token: {TOKEN}
sets:
  all:
    match:
      - meta: domain
        regex: '^trap\\.example$'
    rotate: {{max_messages: 60}}
  {PRIVATE_SET}:
    match:
      - meta: domain
        regex: '\\.vault\\.trap\\.example$'
    rotate: {{max_messages: 40}}
    private: true
    token: {SET_TOKEN}
"""
    )


def settle(node: Node, deadline: float = 60) -> None:
    """Until everything accepted is processed and no session is open."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        s = metrics(node)
        accepted = total(s, "spamtrap_messages_accepted_total")
        if (
            accepted == SESSIONS * PER_SESSION
            and total(s, "spamtrap_messages_processed_total") == accepted
            and total(s, "spamtrap_spool_depth") == 0
            and total(s, "spamtrap_smtp_connections_open") == 0
        ):
            return
        time.sleep(0.1)  # a real process: no clock to inject across a fork
    raise AssertionError(f"the node did not settle: {metrics(node)}")


def test_the_dashboard_in_chromium_matches_metrics(tmp_path: Path) -> None:
    binary = require_binary("chromium")
    node = Node(tmp_path / "data", extra=["--node", "dash1"])
    node.config = tmp_path / "spamtrap.yaml"
    write_config(node.config, node)
    node.start()
    url = f"http://127.0.0.1:{node.http_port}/dashboard?token={TOKEN}"
    try:
        node.wait_for_http()
        assert node.http_get("/dashboard/data.json")[0] == 401  # the figures need the token
        assert node.http_get(f"/dashboard/data.json?token={TOKEN}")[0] == 200
        errors: list[BaseException] = []
        load = threading.Thread(target=send_load, args=(node, errors))
        load.start()
        try:
            during = dump(binary, url, tmp_path)
        finally:
            load.join(timeout=120)
        assert not load.is_alive() and not errors, errors
        assert during.status() == "live", "the page did not update during the load"
        assert 0 <= during.value("messages_accepted") <= SESSIONS * PER_SESSION

        settle(node)
        netlog = tmp_path / "netlog.json"
        after = dump(binary, url, tmp_path, netlog)
        s = metrics(node)
        check_figures(after, s)
        check_privacy(after)
        check_links(after, node)
        check_requests(netlog, node)
        screenshot(binary, url, tmp_path)
    finally:
        assert node.stop() in (0, -15), node.log()


def check_figures(page: Figures, s: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    accepted = SESSIONS * PER_SESSION
    assert (
        page.value("messages_accepted") == total(s, "spamtrap_messages_accepted_total") == accepted
    )
    assert (
        page.value("messages_rejected") == total(s, "spamtrap_messages_rejected_total") == REFUSED
    )
    assert page.value("messages_shed") == total(s, "spamtrap_spool_shed_total") == 0
    assert page.value("sessions_open") == total(s, "spamtrap_smtp_connections_open") == 0
    assert page.value("spool_depth") == total(s, "spamtrap_spool_depth") == 0
    assert page.value("messages_processed") == total(s, "spamtrap_messages_processed_total")
    assert page.value("intake_last_hour") == accepted
    for name in (
        "messages",
        "duplicates",
        "sampled_out",
        "bundles_open",
        "bundles_stored",
        "bundles_waiting",
        "bundles_skipped",
    ):
        metric = {
            "messages": "spamtrap_set_messages_total",
            "duplicates": "spamtrap_set_duplicates_total",
            "sampled_out": "spamtrap_campaign_sampled_out_total",
            "bundles_open": "spamtrap_bundles_open",
            "bundles_stored": "spamtrap_bundles_total",
            "bundles_waiting": "spamtrap_bundles_waiting",
            "bundles_skipped": "spamtrap_bundles_skipped_total",
        }[name]
        assert page.value(f"set_{name}", set="all") == total(s, metric, set="all"), name
        assert page.value(f"set_{name}", set="(private)") == total(s, metric, set=PRIVATE_SET), name
    assert page.value("set_messages", set="all") == accepted
    assert page.value("set_messages", set="(private)") == accepted / 2
    assert page.value("set_bundles_stored", set="all") >= 4  # 300 messages, 60 a bundle
    verdicts = {
        (f["stage"], f["verdict"]): float(f["value"])
        for f in page.found
        if f["metric"] == "filter_verdicts"
    }
    assert verdicts, "no verdicts shown"
    expected: dict[tuple[str, str], float] = {}
    for (name, labels), v in s.items():
        if name == "spamtrap_filter_verdicts_total":
            d = dict(labels)
            key = (d["stage"], d["verdict"])
            expected[key] = expected.get(key, 0.0) + v
    assert verdicts == expected
    assert page.all("top_helo") == {h: accepted / len(HELOS) for h in HELOS}
    assert page.all("top_peer") == {"127.0.0.0/24": accepted}
    # Every message landed with a campaign; 300 near-copies make only a few.
    campaigns = page.all("top_campaign")
    assert page.value("campaigns_tracked") == total(s, "spamtrap_campaigns_tracked")
    assert 1 <= len(campaigns) <= total(s, "spamtrap_campaigns_new_total")
    if total(s, "spamtrap_campaigns_new_total") <= 10:  # the whole list is shown
        assert sum(campaigns.values()) == accepted
    dialects = page.all("top_dialect")
    assert dialects and all(0 < n <= accepted for n in dialects.values())
    assert all(re.match(r"cmds=EHLO:(fqdn|words),MAIL", d) for d in dialects), dialects
    assert any(d.startswith("cmds=EHLO:words,") for d in dialects)  # the markup HELO
    sparkline = next(f for f in page.found if f["metric"] == "intake_per_minute")
    assert sum(map(int, sparkline["value"].split(","))) == accepted


def check_privacy(page: Figures) -> None:
    assert "img" not in page.tags  # the HELO stayed text
    assert HELOS[-1] in page.text
    text = "".join(page.text) + json.dumps(page.found)
    for secret in (PRIVATE_SET, SET_TOKEN, TOKEN, "@trap.example", "user1@"):
        assert secret not in text, secret


def check_links(page: Figures, node: Node) -> None:
    links = re.findall(r'href="(http://127\.0\.0\.1:\d+/bundles/all/[^"]+)"', page.html)
    assert links, "no bundle links"
    with urllib.request.urlopen(links[0], timeout=10) as r:  # noqa: S310 - loopback only
        assert r.status == 200 and r.read(2) == b"\x1f\x8b"  # a gzipped bundle


def page_requests(netlog: Path, origin: str) -> list[str]:
    """The URLs the page (its frame, script and fetches) asked for, from
    Chromium's network log. Chromium's own background requests (time,
    updates, accounts: none of them resolved, see CHROMIUM_FLAGS) have no
    initiator and another isolation key, and are not the page's."""
    text = netlog.read_text(errors="replace").rstrip().rstrip(",")
    doc = json.loads(text if text.endswith("}") else text + "]}")  # cut off at exit
    start = doc["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    site = origin.rsplit(":", 1)[0]  # the isolation key names the site: no port
    urls = []
    for event in doc["events"]:
        params = event.get("params", {})
        if event["type"] != start:
            continue
        if params.get("initiator") == origin or params.get("network_isolation_key", "").startswith(
            site + " "
        ):
            urls.append(params["url"])
    return urls


def check_requests(netlog: Path, node: Node) -> None:
    origin = f"http://127.0.0.1:{node.http_port}"
    urls = page_requests(netlog, origin)
    assert urls[0].startswith(origin + "/dashboard?token="), urls
    assert origin + "/dashboard/data.json" in urls, urls  # it polled
    off_host = [u for u in urls if not u.startswith(origin + "/")]
    assert off_host == [], "the page fetched from elsewhere"


def screenshot(binary: str, url: str, out_dir: Path) -> None:
    png = out_dir / "dashboard.png"
    done = chromium(
        binary,
        url,
        out_dir,
        "--virtual-time-budget=6000",
        "--hide-scrollbars",
        "--window-size=1280,1400",
        f"--screenshot={png}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("SPAMTRAP_SCREENSHOT")
    if target:
        shutil.copyfile(png, REPO / target)
