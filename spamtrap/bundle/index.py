"""A bundle's index: ``<name>.index.jsonl`` beside each ``<name>.mbox.gz``.

One JSON object per line, one line per message, in the order of the bundle:

- ``offset``, ``length``: the entry's byte range in the *uncompressed* mbox,
  from its ``From `` line up to and including its blank separator line.
  ``zcat bundle | tail -c +$((offset+1)) | head -c $length`` is the entry.
- ``id`` (``X-Spamtrap-Id``), ``received`` (ISO 8601 UTC), ``peer`` (the
  client's address, without the port), ``helo``, ``rcpts`` (how many
  recipients: a count, never the addresses), ``size`` (bytes received),
  ``feed`` (the feed id or null), ``dialect`` (``X-Spamtrap-Dialect``),
  ``campaign`` (``X-Spamtrap-Campaign``, null when none was assigned) and
  ``reasons``: the stage verdicts worth reading (every one that is not a
  plain pass), each ``{"stage", "verdict", "reason"}``.

The fields come from the copy of the message the set stores, so a set that
redacts trap addresses gets them redacted here too (a HELO naming a trap
address, a stage reason quoting one); no recipient address is in the index.

The writer side is split for speed: the pipeline encodes a message's fields
once (:func:`encode_fields`, in the filter thread that decided it), and the
bundle file, which alone knows where the entry lands, wraps them with the
offset and length (:func:`index_line`). The reader side
(:func:`read_index`) checks every line and names the file and line of the
first bad one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from spamtrap.message import Envelope, iso_time

# Fields of every line a spamtrap writes, with the JSON types allowed.
_STR_OR_NULL = (str, type(None))
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "offset": (int,),
    "length": (int,),
    "id": _STR_OR_NULL,
    "received": _STR_OR_NULL,
    "peer": _STR_OR_NULL,
    "helo": _STR_OR_NULL,
    "rcpts": (int,),
    "size": (int,),
    "feed": _STR_OR_NULL,
    "dialect": _STR_OR_NULL,
    "campaign": _STR_OR_NULL,
    "reasons": (list,),
}
# What every line must have; the rest is absent for entries written without
# a message's fields (bundles written by a caller that passes none).
REQUIRED = ("offset", "length")
MAX_LINE = 1 << 20  # bytes; a line is a few hundred

# ASCII: a sender's undecodable bytes (surrogates) become \u escapes and
# can never make the encoding fail.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_encode_str = _ENCODER.encode  # a str alone: the C ASCII string encoder


class IndexFormatError(ValueError):
    """A bad index line: ``where`` is the file (or URL), ``line`` its number."""

    def __init__(self, where: str, line: int, problem: str) -> None:
        super().__init__(f"{where}:{line}: {problem}")
        self.where = where
        self.line = line
        self.problem = problem


def _first(env: Envelope, name: str) -> str | None:
    values = env.values(name)
    return values[0] if values else None


def _peer_host(peer: str | None) -> str | None:
    # X-Spamtrap-Peer is "<host> <port>": the port says nothing about spam.
    return peer.rsplit(" ", 1)[0] if peer and " " in peer else peer


def _size(env: Envelope) -> int:
    text = _first(env, "size")
    return int(text) if text is not None and text.isdigit() else len(env.data)


def encode_fields(env: Envelope, rcpts: int, reasons: Sequence[tuple[str, str, str]] = ()) -> bytes:
    """A message's index fields as the body of a JSON object (no braces),
    for :func:`index_line`. ``env`` is the copy the set stores (redacted or
    not); ``rcpts`` the number of recipients of the original; ``reasons``
    the verdicts to record, ``(stage, verdict, reason)``."""
    # By hand, not one encode of a dict: this runs for every stored copy,
    # and strings through the C encoder one by one take less than half the time.
    text = (
        f'"id":{_json_str(env.msg_id)},'
        f'"received":{_json_str(_first(env, "received") or iso_time(env.received_at))},'
        f'"peer":{_json_str(_peer_host(_first(env, "peer")))},'
        f'"helo":{_json_str(_first(env, "helo"))},'
        f'"rcpts":{int(rcpts)},"size":{_size(env)},'
        f'"feed":{_json_str(env.feed)},'
        f'"dialect":{_json_str(_first(env, "dialect"))},'
        f'"campaign":{_json_str(_first(env, "campaign"))},'
        f'"reasons":{_reasons(reasons)}'
    )
    return text.encode("ascii")


def _json_str(value: str | None) -> str:
    return "null" if value is None else _encode_str(value)


def _reasons(reasons: Sequence[tuple[str, str, str]]) -> str:
    if not reasons:
        return "[]"
    return _ENCODER.encode([{"stage": s, "verdict": v, "reason": r} for s, v, r in reasons])


def index_line(offset: int, length: int, fields: bytes | None) -> bytes:
    """One index line: the entry's range, then its fields (if known)."""
    head = b'{"offset":%d,"length":%d' % (offset, length)
    if fields:
        return head + b"," + fields + b"}\n"
    return head + b"}\n"


def notable(verdicts: Iterable[Any]) -> list[tuple[str, str, str]]:
    """The verdicts an index records: all but the plain passes (a pass
    without a reason says nothing). ``verdicts`` are StageVerdicts."""
    return [(v.stage, v.verdict, v.reason) for v in verdicts if v.verdict != "pass" or v.reason]


@dataclass(frozen=True)
class IndexEntry:
    """One checked line of an index."""

    line: int
    fields: Mapping[str, Any]

    @property
    def offset(self) -> int:
        return int(self.fields["offset"])

    @property
    def length(self) -> int:
        return int(self.fields["length"])

    def get(self, name: str) -> Any:
        return self.fields.get(name)


def parse_line(raw: bytes, where: str, number: int) -> IndexEntry:
    """Check one line (without its line end); IndexFormatError otherwise."""
    try:
        doc = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError too
        raise IndexFormatError(where, number, f"not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise IndexFormatError(where, number, "not a JSON object")
    for name in REQUIRED:
        if name not in doc:
            raise IndexFormatError(where, number, f"{name}: missing")
    for name, types in FIELD_TYPES.items():
        if name in doc:
            value = doc[name]
            if not isinstance(value, types) or isinstance(value, bool):
                raise IndexFormatError(where, number, f"{name}: unexpected value {value!r:.60}")
    if doc["offset"] < 0 or doc["length"] <= 0:
        raise IndexFormatError(where, number, "offset/length: not a byte range")
    return IndexEntry(number, doc)


def read_index(stream: BinaryIO | Iterable[bytes], where: str) -> Iterator[IndexEntry]:
    """The checked entries of an index, in order; IndexFormatError names
    ``where`` and the line number of the first bad line. Blank lines are
    bad too: a writer never leaves one."""
    for number, raw in enumerate(stream, 1):
        if len(raw) > MAX_LINE:
            raise IndexFormatError(where, number, f"line longer than {MAX_LINE} bytes")
        if not raw.endswith(b"\n"):
            raise IndexFormatError(where, number, "truncated (no line end)")
        yield parse_line(raw[:-1], where, number)
