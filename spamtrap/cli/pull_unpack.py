"""spamtrap pull's unpacking: a verified bundle into an mbox file or a
maildir."""

from __future__ import annotations

import calendar
import gzip
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from spamtrap.bundle.mbox import MboxReader
from spamtrap.cli.pull_remote import CHUNK, KEY_TIME
from spamtrap.store import KEY_RE


def unpack_mbox(bundle: str, target: str, offset: int) -> None:
    """Append the bundle's mboxrd to ``target``; first cut ``target`` back
    to ``offset``, where this bundle's earlier, interrupted append began."""
    with gzip.open(bundle, "rb") as src:
        head = src.read(5)
        if head and head != b"From ":
            raise ValueError("the bundle is not an mbox")
        with open(target, "ab") as dst:
            dst.truncate(min(offset, os.fstat(dst.fileno()).st_size))
            dst.write(head)
            shutil.copyfileobj(src, dst, CHUNK)
            dst.flush()
            os.fsync(dst.fileno())


@dataclass
class Skipped:
    """A message of a bundle that ``transform`` refused (ValueError)."""

    index: int  # 1-based position in the bundle
    message_id: str | None  # its X-Spamtrap-Id, else its Message-ID
    error: str


# X-Spamtrap-Id first: it is ours, and unique within the corpus.
_ID_FIELDS = re.compile(rb"^(x-spamtrap-id|message-id):[ \t]*([^\r\n]*)", re.I | re.M)
_ID_SCAN = 64 * 1024  # the header section's start is enough to find them


def message_id_of(message: bytes) -> str | None:
    """The stored message's X-Spamtrap-Id, else its Message-ID, else None:
    for naming it in an error (never parsed further)."""
    head = message[:_ID_SCAN]
    end = re.search(rb"\r?\n\r?\n", head)
    found: dict[bytes, str] = {}
    for m in _ID_FIELDS.finditer(head[: end.start()] if end else head):
        value = m.group(2).strip().decode("ascii", "replace")
        if value:
            found.setdefault(m.group(1).lower(), value[:200])
    return found.get(b"x-spamtrap-id") or found.get(b"message-id")


def unpack_maildir(
    bundle: str, maildir: str, key: str, transform: Callable[[bytes], bytes] | None = None
) -> list[Skipped]:
    """One file per message in ``maildir/new`` (each message through
    ``transform`` first, if given). The names are standard (time.unique.host)
    and derived from the key, so unpacking again after an interruption
    replaces files instead of adding copies. A message ``transform``
    refuses is not written; it is returned, and the rest go on."""
    skipped: list[Skipped] = []
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    m = KEY_RE.fullmatch(key)
    assert m is not None
    stamp = calendar.timegm(time.strptime(m.group("time"), KEY_TIME))
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    with gzip.open(bundle, "rb") as f:
        for i, (_, message) in enumerate(MboxReader(f)):  # type: ignore[arg-type]
            if transform is not None:
                try:
                    message = transform(message)
                except ValueError as e:
                    skipped.append(Skipped(i + 1, message_id_of(message), str(e)))
                    continue
            name = f"{stamp}.R{m.group('random')}Q{i}.{host}"
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as out:
                out.write(message)
            os.replace(tmp, os.path.join(maildir, "new", name))
    return skipped
