"""Per-bundle indexes through a real twistd over loopback SMTP: an index
beside each rotated bundle whose ranges are exactly its entries, the
manifest's sha256 of it, no trap address in a redacting set's, served over
HTTP; then ``spamtrap pull`` and ``spamtrap stats`` run as programs
against the node and the pulled directory."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from spamtrap.bundle.mbox import MboxReader
from spamtrap.store import INDEX_SUFFIX, MANIFEST_SUFFIX
from tests.support.node import REPO, Node, RawSMTP
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

TOKEN = "stats-token-0123456789"
CONFIG = f"""
node: indexnode
traps:
  domains: [trap.example]
sets:
  all:
    token: {TOKEN}
    rotate: {{max_messages: 4, max_age: 2s}}
    upload_policy: queue  # rotating fast: never skip a bundle
  open:
    redact_trap_addresses: true
    rotate: {{max_messages: 5, max_age: 2s}}
    upload_policy: queue
"""
SENT = 11


def spamtrap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spamtrap.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def message(n: int) -> bytes:
    return (
        b"From: Winner <w@bot.example>\r\nTo: victim%d@trap.example\r\n"
        b"Subject: offer %d\r\n\r\nFrom the desk of victim%d@trap.example\r\n.hidden\r\n"
        % (n, n, n)
    )


def on_disk(node: Node, set_name: str) -> int:
    """Messages in the set's stored bundles, by their manifests (the
    commit markers: each is written after its bundle and index)."""
    manifests = (node.data_dir / "bundles" / set_name).glob("*" + MANIFEST_SUFFIX)
    return sum(json.loads(m.read_bytes())["messages"] for m in manifests)


def check_bundles(set_dir: Path, manifests: Path | None = None) -> list[dict[str, Any]]:
    """Every bundle's index against its bytes and manifest (beside it, or
    in ``manifests``: pull keeps none); the lines."""
    bundles = sorted(set_dir.glob("*.mbox.gz"))
    assert bundles
    lines: list[dict[str, Any]] = []
    for bundle in bundles:
        stem = str(bundle)[: -len(".mbox.gz")]
        index = Path(stem + INDEX_SUFFIX).read_bytes()
        name = Path(stem + MANIFEST_SUFFIX).name
        manifest = json.loads(((manifests or set_dir) / name).read_bytes())
        assert manifest["index"] == Path(stem + INDEX_SUFFIX).name
        assert manifest["index_sha256"] == hashlib.sha256(index).hexdigest()
        raw = gzip.decompress(bundle.read_bytes())
        docs = [json.loads(line) for line in index.splitlines()]
        assert len(docs) == manifest["messages"]
        for doc in docs:
            piece = raw[doc["offset"] : doc["offset"] + doc["length"]]
            [(_, stored)] = list(MboxReader(iter(piece.splitlines(keepends=True))))  # type: ignore[arg-type]
            assert stored.startswith(b"X-Spamtrap-Id: " + doc["id"].encode() + b"\n")
        assert sum(d["length"] for d in docs) == len(raw)
        lines += docs
    return lines


def test_indexes_beside_bundles_then_pull_and_stats(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    node = Node(tmp_path / "data", config=cfg)
    base = f"http://{node.host}:{node.http_port}"
    cfg.write_text(CONFIG + f"http: {{public_url: '{base}'}}\n")
    node.start()
    try:
        c = RawSMTP(node.host, node.smtp_port)
        c.cmd(b"EHLO bot.example", 250)
        for n in range(SENT):
            c.send(b"w@bot.example", [f"victim{n}@trap.example".encode()], message(n))
        c.close()
        wait_until(lambda: all(on_disk(node, s) == SENT for s in ("all", "open")), 60, "stored")

        lines = check_bundles(node.data_dir / "bundles" / "all")
        assert (
            len(lines) == SENT and len(list((node.data_dir / "bundles/all").glob("*.mbox.gz"))) >= 3
        )
        assert {d["rcpts"] for d in lines} == {1}
        assert all(d["helo"] == "bot.example" and d["peer"] == "127.0.0.1" for d in lines)
        assert all(d["dialect"] and d["size"] >= len(message(0)) for d in lines)
        assert all(d["campaign"] for d in lines)  # campaigns are assigned before sets
        open_lines = check_bundles(node.data_dir / "bundles" / "open")
        assert len(open_lines) == SENT
        for index in (node.data_dir / "bundles" / "open").glob("*" + INDEX_SUFFIX):
            assert b"trap.example" not in index.read_bytes()

        # Served like the bundle, with the listing naming it.
        some = sorted((node.data_dir / "bundles" / "all").glob("*" + INDEX_SUFFIX))[0]
        with urllib.request.urlopen(f"{base}/bundles/all/{some.name}", timeout=10) as r:  # noqa: S310
            assert r.headers["Content-Type"] == "application/x-ndjson"
            assert r.read() == some.read_bytes()
        status, body = node.http_get("/bundles/all/", token=TOKEN)
        listed = json.loads(body)["bundles"]
        assert status == 200 and all(b["index_url"].endswith(INDEX_SUFFIX) for b in listed)

        # spamtrap pull fetches and verifies each index beside its bundle.
        dest = tmp_path / "pulled"
        pulled = spamtrap(
            "pull", "--http", base, "--set", "all", "--token", TOKEN, "--dest", str(dest)
        )
        assert pulled.returncode == 0, pulled.stderr
        assert check_bundles(dest / "all", node.data_dir / "bundles" / "all") == lines
        state = json.loads((dest / ".spamtrap-pull.json").read_text())
        assert all("index_sha256" in entry for entry in state["bundles"].values())

        # spamtrap stats: the pulled directory, the store, the node's listing.
        local = spamtrap("stats", "--json", "--by", "day", str(dest))
        assert local.returncode == 0, local.stderr
        doc = json.loads(local.stdout)
        assert doc["messages"] == SENT and doc["errors"] == 0
        [day] = doc["periods"]
        assert day["peers"] == [{"value": "127.0.0.1", "count": SENT}]
        store = spamtrap(
            "stats", "--json", "--by", "day", "--set", "all", str(node.data_dir / "bundles")
        )
        assert json.loads(store.stdout)["periods"] == doc["periods"]
        remote = spamtrap(
            "stats", "--json", "--by", "day", f"{base}/bundles/all/", env={"SPAMTRAP_TOKEN": TOKEN}
        )
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["periods"] == doc["periods"]
        text = spamtrap("stats", str(dest))
        assert text.returncode == 0 and f"{SENT} messages in" in text.stdout
        refused = spamtrap("stats", f"{base}/bundles/all/", env={"SPAMTRAP_TOKEN": ""})
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    finally:
        node.stop()

    # Bad input: a missing directory, a damaged index (file and line, no traceback).
    missing = spamtrap("stats", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    damaged = sorted((dest / "all").glob("*" + INDEX_SUFFIX))[0]
    damaged.write_bytes(damaged.read_bytes() + b"{broken\n")
    broken = spamtrap("stats", str(dest))
    assert broken.returncode == 1
    n = len(damaged.read_bytes().splitlines())
    assert f"{damaged}:{n}: not JSON" in broken.stderr and "Traceback" not in broken.stderr
