"""Bundles and manifests as a node stores them, and ``spamtrap pull`` run from
a test: shared by the pull unit and integration tests."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import time

from twisted.internet.threads import deferToThread

from spamtrap.bundle import mbox
from spamtrap.bundle.manifest import Manifest
from spamtrap.cli.main import build_parser
from spamtrap.cli.pull import (
    run,
)

SHARED_TOKEN = "tok-shared-0123456789"


PRIVATE_TOKEN = "tok-private-9876543210"


T0 = 1767225600  # 2026-01-01T00:00:00Z


def message(n: int, padding: int = 0) -> bytes:
    """A message; ``padding`` bytes of incompressible text make big bundles."""
    body = hashlib.sha256(b"%d" % n).hexdigest().encode()
    extra = b"".join(
        hashlib.sha256(b"%d-%d" % (n, i)).hexdigest().encode() + b"\r\n"
        for i in range(padding // 66)
    )
    return (
        b"From: Spammer <spammer@example.net>\r\n"
        b"To: trap@trap.example\r\n"
        b"Subject: offer %d\r\n"
        b"Message-ID: <%d@example.net>\r\n"
        b"\r\n"
        b"From the desk of the spammer\r\n"  # mboxrd quotes this line
        b"%s\r\n%s" % (n, n, body, extra)
    )


def gzip_mbox(messages: list[bytes], when: float) -> bytes:
    return gzip.compress(b"".join(mbox.entry("spammer@example.net", when, m) for m in messages))


def manifest(key: str, data: bytes, messages: int, when: float) -> bytes:
    """BundleSet's manifest bytes: what a node stores and serves."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return Manifest(
        set=key.split("/")[0],
        key=key,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        messages=messages,
        first_received=stamp,
        last_received=stamp,
        node="node1",
    ).to_json_bytes()


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["pull", *argv])


async def pull(*argv: str) -> tuple[int, str]:
    """Run pull in a thread (it blocks); its exit status and stderr."""
    err = io.StringIO()
    code = await deferToThread(run, parse(list(argv)), err)
    return code, err.getvalue()


def stored(wire: bytes, line_endings: str) -> bytes:
    """``wire`` as a set stores it, through the daemon's own Envelope."""
    from spamtrap.message import Envelope, line_ends_of

    env = Envelope("id1", T0, "spammer@example.net", ["trap@trap.example"], wire)
    env.meta = {"id": ["id1"], "node": ["node1"], "line_ends": [line_ends_of(wire)]}
    env.received = ["from spam.example ([192.0.2.1])", "by trap.example; Thu, 1 Jan 2026"]
    return env.stored_bytes(line_endings)
