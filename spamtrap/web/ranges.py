"""Bundle downloads from the local store: static.File streaming, with
``Range`` requests (resumed downloads) bounded by :func:`plan_ranges`."""

from __future__ import annotations

import re
from typing import Any

from twisted.web import static

from spamtrap.web.pages import NOT_FOUND

# Byte ranges one response may send, after overlapping and adjacent ones
# are joined. More (after joining) get the whole file with a 200 instead.
MAX_RANGES = 16
# A Range header is a handful of bytes from a resuming client; a longer one
# is not worth parsing (RFC 9110 14.2 lets a server ignore any Range).
MAX_RANGE_HEADER = 4096
_RANGE_SPEC = re.compile(rb"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")


def plan_ranges(header: bytes, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges to send for a ``Range`` header on a ``size``-byte file.

    Returns None to ignore the header (send the whole file with 200): it is
    malformed, not in bytes, or asks for more than MAX_RANGES separate
    pieces. Otherwise the satisfiable ranges as inclusive ``(first, last)``
    offsets, overlapping and adjacent ones joined, in ascending order, so
    the parts never add up to more than the file; an empty list means none
    is satisfiable (416).
    """
    # QUIRK: RFC 9110 14.2 allows both the joining and the ignoring. Without
    # them a Range of a thousand overlapping "0-" specs makes a 3 KB request
    # download the file a thousand times. RFC 9110 14.6 asks for the parts
    # in the order requested: joined parts cannot keep it, and real clients
    # (curl, wget, browsers, spamtrap pull) ask in ascending order anyway.
    if len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, specs = header.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes" or not specs.strip(b" \t,"):
        return None
    wanted: list[tuple[int, int]] = []
    for spec in specs.split(b","):
        if not spec.strip():
            continue  # RFC 9110 5.6.1: empty list elements are ignored
        m = _RANGE_SPEC.fullmatch(spec)
        if m is None:
            return None
        first_text, last_text = m.groups()
        if not first_text:
            if not last_text:
                return None
            # A suffix: the last N bytes; "-0" is satisfiable by nothing.
            length = int(last_text)
            if length > 0 and size > 0:
                wanted.append((max(0, size - length), size - 1))
            continue
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
        if last_text and last < first:
            return None
        if first < size:
            wanted.append((first, min(last, size - 1)))
    joined: list[tuple[int, int]] = []
    for first, last in sorted(wanted):
        if joined and first <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], last))
        else:
            joined.append((first, last))
    if len(joined) > MAX_RANGES:
        return None
    return joined


class BundleFile(static.File):
    """A static.File with our content type, our plain 404 and bounded ranges."""

    # Plain 404s that also reset the immutable Cache-Control; and do not
    # tell which files exist but are unreadable.
    childNotFound = NOT_FOUND  # type: ignore[assignment]
    forbidden = NOT_FOUND  # type: ignore[assignment]

    def __init__(self, path: str, content_type: bytes) -> None:
        super().__init__(path)
        self.type = content_type.decode("ascii")
        self.encoding = None

    def makeProducer(self, request: Any, file: Any) -> Any:  # noqa: N802 - static.File API
        """static.File's, with the Range header planned by plan_ranges: it
        sends any overlapping range as often as it is asked for (and logs
        every malformed header in full)."""
        header = request.getHeader(b"range")
        if header is None:
            return super().makeProducer(request, file)
        size = self.getFileSize()
        ranges = plan_ranges(header, size)
        if ranges is None:
            self._setContentHeaders(request)
            request.setResponseCode(200)
            return static.NoRangeStaticProducer(request, file)
        if len(ranges) <= 1:
            # No satisfiable range: static.File's own 416, with "*/size".
            first, last = ranges[0] if ranges else (size, None)
            offset, length = self._doSingleRangeRequest(request, (first, last))
            self._setContentHeaders(request, length)
            return static.SingleRangeStaticProducer(request, file, offset, length)
        info = self._doMultipleRangeRequest(request, ranges)
        return static.MultipleRangeStaticProducer(request, file, info)
