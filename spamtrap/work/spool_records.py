"""The spool's files: the record format, reading records back, and the
scans recovery makes (see spamtrap.work.spool for the whole design).

A segment ``DIR/seg-<16-digit seq>.log`` holds records, each a header
``b"SPR1" + struct(">IQI", payload_len, received_at_ms, crc32(payload))``
followed by the payload; ``seg-<seq>.ack`` beside it lists, one decimal
offset a line, the records that are done.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.logger import Logger

from spamtrap.errors import SourceStoppedError, WorkSourceError

MAGIC = b"SPR1"
# magic, payload length, received_at in ms, crc32 of the payload
HEADER = struct.Struct(">4sIQI")
MAX_PAYLOAD = 0xFFFFFFFF
SEGMENT_NAME = re.compile(r"^seg-(\d{16})\.(log|ack)$")

log = Logger()


class SpoolError(WorkSourceError):
    """The spool could not store or return a message."""


class SpoolStoppedError(SpoolError, SourceStoppedError):
    """The spool stopped: it takes and hands out nothing any more."""


def segment_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"seg-{seq:016d}.log")


def ack_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"seg-{seq:016d}.ack")


@dataclass(slots=True, eq=False)
class SpoolEntry:
    """Where one spooled record lives; the payload stays on disk."""

    seq: int  # segment
    offset: int  # of the record header in the segment
    size: int  # payload bytes
    received_at: float  # seconds, millisecond precision
    path: str = field(repr=False)  # the segment file

    @property
    def key(self) -> tuple[int, int]:
        return (self.seq, self.offset)

    def read(self) -> bytes:
        """The payload, read from disk and CRC-checked. Blocking: call it in a
        worker thread."""
        (payload,) = read_entries([self])
        if isinstance(payload, SpoolError):
            raise payload
        return payload


# Longest single read when read_entries() joins adjacent records.
READ_SPAN = 4 * 1024 * 1024


def read_entries(entries: Sequence[SpoolEntry]) -> list[bytes | SpoolError]:
    """The payloads of ``entries`` in order, CRC-checked; a SpoolError in
    place of each one that cannot be read. Blocking: call it in a worker
    thread.

    Each segment is opened once, and a run of adjacent records (the usual
    case: the queue is FIFO) is read with one pread. A worker thread that
    makes one system call per batch instead of four per message hands the
    GIL back and forth far less often.

    Every consumer reads a record once, so the pages read are dropped from
    the page cache (clean ones: durable records); see drop_cached.
    """
    out: list[bytes | SpoolError] = []
    fds: dict[str, int] = {}
    try:
        i = 0
        while i < len(entries):
            first = entries[i]
            # The run: following entries of the same segment, back to back.
            end = first.offset + HEADER.size + first.size
            j = i + 1
            while j < len(entries):
                e = entries[j]
                if e.path != first.path or e.offset != end or end - first.offset > READ_SPAN:
                    break
                end += HEADER.size + e.size
                j += 1
            run = entries[i:j]
            try:
                fd = fds.get(first.path)
                if fd is None:
                    fd = fds[first.path] = os.open(first.path, os.O_RDONLY | os.O_CLOEXEC)
                buf = os.pread(fd, end - first.offset, first.offset)
                drop_cached(fd, first.offset, end - first.offset)
            except OSError as err:
                out.extend(SpoolError(f"spool record {x.path}@{x.offset}: {err}") for x in run)
            else:
                out.extend(_check_record(x, buf, x.offset - first.offset) for x in run)
            i = j
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop a file range's clean pages from the page cache (dirty pages are
    only queued for writeback), for data that is not read again.

    Spool data is written once and read once. Kept cached, it makes the page
    cache grow into memory the machine has not used yet, and on a VM the
    first touch of a page costs far more than a page the kernel just freed:
    on the 2-core benchmark VM (2026-12-03), appending to a new file costs
    10-11 µs of system time per 4 KiB page, 0.8-1.2 µs when the pages come
    from a file dropped just before. Dropped pages are reused by the next
    writes. It also leaves the cache to what is read again (bundles)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:  # advice only; a file system may not take it
        pass


def _check_record(entry: SpoolEntry, buf: bytes, at: int) -> bytes | SpoolError:
    where = f"spool record {entry.path}@{entry.offset}"
    if len(buf) < at + HEADER.size + entry.size:
        return SpoolError(f"{where}: truncated")
    magic, length, _, crc = HEADER.unpack_from(buf, at)
    if magic != MAGIC or length != entry.size:
        return SpoolError(f"{where}: bad header")
    start = at + HEADER.size
    payload = buf[start : start + entry.size]
    if zlib.crc32(payload) != crc:
        return SpoolError(f"{where}: CRC mismatch")
    return payload


def scan_segment(path: str) -> tuple[list[tuple[int, int, int]], int, int]:
    """Valid records of a segment as (offset, size, received_ms), then where
    the scan stopped and the file size. It stops at the first torn or corrupt
    record."""
    records = []
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + HEADER.size <= file_size:
            magic, length, received_ms, crc = HEADER.unpack(f.read(HEADER.size))
            # Check the length against the file before reading: a garbage
            # header must not make us allocate gigabytes.
            if magic != MAGIC or offset + HEADER.size + length > file_size:
                break
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            records.append((offset, length, received_ms))
            offset += HEADER.size + length
    return records, offset, file_size


def read_acks(path: str) -> set[int]:
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return set()
    # The last element is "" or a torn line (no newline): ignore it, and any
    # line that is not a number (an ack file is never fsynced).
    return {int(line) for line in lines[:-1] if line.isdigit()}


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("spool: cannot delete {path}: {error}", path=path, error=e)
