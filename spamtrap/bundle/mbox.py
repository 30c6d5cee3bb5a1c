"""mboxrd writer and reader.

A bundle is a sequence of entries: a strict ``From_`` line, the message bytes
with mboxrd quoting (a line matching ``>*From `` gets one more ``>``), and one
blank line as separator. The writer takes the message bytes as the set
stores them (spamtrap.message.Envelope.stored_bytes: LF line ends for a
``unix`` set, the wire bytes for a ``wire`` one) and changes nothing but the
quoting; mbox only ever looks at ``\\n``. The separator is always a bare
LF, which is what formail and mutt split on.

Round trip: :class:`MboxReader` returns exactly the bytes given to
:func:`entry` for every message that ends with ``\\n``. A message that does
not end with ``\\n`` gets one appended so its last line cannot run into the
separator; that newline is not removed on reading. SMTP DATA always ends with
a line end, so in practice every message round-trips exactly.
"""

from __future__ import annotations

import gzip
import re
import time
from collections.abc import Iterator
from typing import BinaryIO

# The address part of a From_ line may not contain spaces (readers split on
# them) and is decoded as ASCII by Python's mailbox module.
_UNSAFE_ADDR = re.compile(r"[^\x21-\x7e]")
_QUOTE = re.compile(rb"^(>*From )", re.M)
_UNQUOTE = re.compile(rb"^>(>*From )", re.M)
_GZIP_MAGIC = b"\x1f\x8b"


def from_line(mail_from: str, received_at: float) -> bytes:
    """``From <addr> <asctime UTC>\\n``; the null sender is MAILER-DAEMON."""
    addr = mail_from.strip()
    if addr in ("", "<>"):
        addr = "MAILER-DAEMON"
    addr = _UNSAFE_ADDR.sub("_", addr)
    # time.asctime uses fixed English names whatever the locale.
    return b"From %s %s\n" % (addr.encode("ascii"), time.asctime(time.gmtime(received_at)).encode())


def entry(mail_from: str, received_at: float, message: bytes) -> bytes:
    """One mboxrd entry: From_ line, quoted message, blank separator line."""
    if b"From " in message:  # fast path: most messages need no quoting
        message = _QUOTE.sub(rb">\1", message)
    tail = b"\n" if message.endswith(b"\n") else b"\n\n"
    return b"".join((from_line(mail_from, received_at), message, tail))


def _unquote(lines: list[bytes]) -> bytes:
    # Drop the writer's separator line (mailbox.mbox does the same).
    if lines and lines[-1] == b"\n":
        lines.pop()
    message = b"".join(lines)
    if b">From " in message:
        message = _UNQUOTE.sub(rb"\1", message)
    return message


class MboxReader:
    """Iterate ``(from_line, message)`` over an mboxrd file opened in binary.

    ``from_line`` is the ``From_`` line without its line end; ``message`` is
    unquoted and without the separator line. Works on any binary file object,
    including ``gzip.open(path)``.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        head: bytes | None = None
        lines: list[bytes] = []
        for line in self._file:
            if line.startswith(b"From "):
                if head is not None:
                    yield head, _unquote(lines)
                head, lines = line.rstrip(b"\n"), []
            elif head is not None:
                lines.append(line)
            else:
                raise ValueError("not an mbox: data before the first From_ line")
        if head is not None:
            yield head, _unquote(lines)


def read_mbox(path: str) -> list[tuple[bytes, bytes]]:
    """Read a whole mbox file, gunzipping it if it is gzip (by its magic)."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        return list(MboxReader(f))  # type: ignore[arg-type]
