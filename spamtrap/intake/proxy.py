"""PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt).

A load balancer in front of the listeners prepends one header to the TCP
stream that names the real client. It is trusted only from configured
networks (the SMTP factory decides that); this module only parses bytes.

A v2 header is read by its length field: 16 bytes plus up to 65535 bytes of
addresses and TLVs (HAProxy sends TLVs for ALPN, the SNI authority, TLS
facts, unique ids). TLVs are skipped, not interpreted. So a caller waits for
at most ``V2_MAX`` bytes (v2) or ``V1_MAX`` (v1) before ``parse`` either
answers or raises.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (spec section 2.1)
V2_MAX = 16 + 0xFFFF  # fixed part plus the largest length field (spec section 2.2)


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header."""


@dataclass(frozen=True)
class ProxyInfo:
    # None for "UNKNOWN"/LOCAL: the connection's own addresses stay in force.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    version: int


def parse(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Parse a header at the start of ``buf``.

    Returns ``(info, consumed)``, or None when more bytes are needed (never
    more than ``V2_MAX`` in all). Raises ProxyError when the bytes cannot
    become a valid header. An incomplete header costs O(1) to look at, so a
    caller may ask again on every read.
    """
    if buf[:1] == b"\r":
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("bad v2 signature")
        return _parse_v2(buf) if len(buf) >= 16 else None
    n = min(len(buf), 6)
    if buf[:n] != b"PROXY "[:n]:
        raise ProxyError("no PROXY header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyError("v1 header longer than 107 bytes")
        return None
    return _parse_v1(bytes(buf[:end])), end + 2


def _addr(host: bytes, port: bytes, version: int) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
        p = int(port)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProxyError(f"bad address {host!r} {port!r}") from e
    if ip.version != version or not 0 <= p <= 65535 or not port.isdigit():
        raise ProxyError(f"bad address {host!r} {port!r}")
    return str(ip), p


def _parse_v1(line: bytes) -> ProxyInfo:
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyInfo(None, None, 1)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"bad v1 header {line[:60]!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    return ProxyInfo(_addr(parts[2], parts[4], version), _addr(parts[3], parts[5], version), 1)


def _parse_v2(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    ver_cmd, fam, length = struct.unpack("!BBH", buf[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"bad v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"bad v2 command {command}")  # known from the first 16 bytes
    total = 16 + length
    if len(buf) < total:
        return None  # checked before any copy: a 64 KiB header may come a byte at a time
    # The address block comes first; TLVs fill the rest of ``length``.
    body = bytes(buf[16 : min(total, 16 + 36)])
    if command == 0:  # LOCAL: the balancer's own health check
        return ProxyInfo(None, None, 2), total
    family, transport = fam >> 4, fam & 0x0F
    if transport not in (0, 1, 2) or family == 0:
        return ProxyInfo(None, None, 2), total  # UNSPEC/AF_UNIX: keep our own addresses
    if family == 1:
        if length < 12:
            raise ProxyError("short v2 IPv4 block")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
    elif family == 2:
        if length < 36:
            raise ProxyError("short v2 IPv6 block")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
    else:
        return ProxyInfo(None, None, 2), total
    return (
        ProxyInfo(
            (str(ipaddress.ip_address(src)), sport),
            (str(ipaddress.ip_address(dst)), dport),
            2,
        ),
        total,
    )


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and tools)."""
    proto = b"TCP6" if ":" in source[0] else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (
        proto,
        source[0].encode(),
        destination[0].encode(),
        source[1],
        destination[1],
    )


def build_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 PROXY command header, with optional ``(type, value)`` TLVs (for tests and tools)."""
    s, d = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if s.version == 4:
        body = struct.pack("!4s4sHH", s.packed, d.packed, source[1], destination[1])
        fam = 0x11
    else:
        body = struct.pack("!16s16sHH", s.packed, d.packed, source[1], destination[1])
        fam = 0x21
    for kind, value in tlvs:
        body += struct.pack("!BH", kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError(f"v2 header body of {len(body)} bytes is longer than 65535")
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body
