"""PROXY protocol v1/v2 headers: the parser, and sessions behind a trusted balancer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamtrap import testing
from spamtrap.config import SetConfig
from spamtrap.intake import proxy
from tests.support.smtp_helpers import Harness

# HAProxy's TLV types (proxy-protocol.txt 2.2): ALPN, AUTHORITY, UNIQUE_ID, SSL, NETNS.
TLV_TYPES = [0x01, 0x02, 0x05, 0x20, 0x30, 0xE0]
SRC, DST = ("203.0.113.9", 5555), ("198.51.100.1", 25)


def trusted_harness() -> Harness:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"],
        sets=[SetConfig(name="all")],
    )
    return Harness(cfg)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def test_v2_with_a_1000_byte_tlv_is_accepted() -> None:
    h = trusted_harness()
    header = proxy.build_v2(SRC, DST, tlvs=((0x05, b"u" * 1000),))
    h.send(header + b"EHLO x\r\n")
    assert h.codes() == [220, 250]
    h.transaction(b"x\r\n")
    assert h.submitted[0].meta["peer"] == ["203.0.113.9 5555"]
    assert h.submitted[0].meta["local"] == ["198.51.100.1 25"]


@pytest.mark.parametrize("step", [None, 1000, 7])
def test_v2_of_the_largest_length_is_accepted_in_any_reads(step: int | None) -> None:
    h = trusted_harness()
    body_room = 0xFFFF - 12 - 3  # the IPv4 block, one TLV header
    header = proxy.build_v2(SRC, DST, tlvs=((0xE0, b"\x00" * body_room),))
    assert len(header) == proxy.V2_MAX
    stream = header + b"EHLO x\r\n"
    for c in [stream] if step is None else pieces(stream, list(range(0, len(stream), step))):
        h.send(c)
    assert h.codes() == [220, 250]
    assert h.proto.peer == SRC


def test_v2_local_with_tlvs_keeps_the_connection_addresses() -> None:
    header = proxy.V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 7) + b"\x01\x00\x04h2\x00\x00"
    h = trusted_harness()
    h.send(header + b"EHLO x\r\n")
    assert h.codes() == [220, 250]
    assert h.proto.peer == ("192.0.2.7", 40000) and h.proto.proxied_by is None


def test_bad_v2_command_is_refused_from_its_first_16_bytes() -> None:
    header = proxy.V2_SIGNATURE + struct.pack("!BBH", 0x22, 0x11, 0xFFFF)
    with pytest.raises(proxy.ProxyError, match="command"):
        proxy.parse(header)
    h = trusted_harness()
    h.send(header)
    assert h.replies() == [b"421 4.7.0 Bad PROXY protocol header"]
    assert h.transport.disconnecting


def test_v1_longer_than_107_bytes_is_refused() -> None:
    with pytest.raises(proxy.ProxyError, match="107"):
        proxy.parse(b"PROXY TCP4 " + b"1" * 200)
    assert proxy.parse(b"PROXY TCP4 " + b"1" * 90) is None  # may still end


def test_build_v2_refuses_a_body_over_65535() -> None:
    with pytest.raises(ValueError, match="65535"):
        proxy.build_v2(SRC, DST, tlvs=((0xE0, b"x" * 0xFFFF),))


ADDR4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
ADDR6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
TLVS = st.lists(
    st.tuples(st.sampled_from(TLV_TYPES), st.binary(max_size=300) | st.just(b"t" * 20_000)),
    max_size=3,
).map(tuple)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    src, dst = draw(st.one_of(st.tuples(ADDR4, ADDR4), st.tuples(ADDR6, ADDR6)))
    if draw(st.booleans()):
        return proxy.build_v1(src, dst), src, dst
    return proxy.build_v2(src, dst, tlvs=draw(TLVS)), src, dst


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(headers(), st.lists(st.integers(0, 70_000), max_size=10), st.binary(max_size=40))
def test_any_header_in_any_fragmentation_names_the_client(
    hdr: tuple[bytes, tuple[str, int], tuple[str, int]], cuts: list[int], tail: bytes
) -> None:
    header, src, dst = hdr
    # The parser: every proper prefix asks for more, the whole header is consumed.
    for c in {*(c for c in cuts if c < len(header)), 0, 15, 16, len(header) - 1}:
        assert proxy.parse(header[: max(c, 0)]) is None
    parsed = proxy.parse(header + tail)
    assert parsed is not None
    info, consumed = parsed
    assert consumed == len(header) and info.source == src and info.destination == dst
    # A session behind the balancer, the header cut anywhere.
    h = trusted_harness()
    for piece in pieces(header + b"EHLO x\r\nNOOP\r\n", cuts):
        h.send(piece)
    assert h.codes() == [220, 250, 250]
    assert h.proto.peer == src and h.proto.proxied_by == ("192.0.2.7", 40000)


@given(st.binary(max_size=200), st.sampled_from([b"", proxy.V2_SIGNATURE, b"PROXY "]))
def test_the_parser_raises_only_proxy_error(data: bytes, prefix: bytes) -> None:
    try:
        proxy.parse(bytearray(prefix + data))
    except proxy.ProxyError:
        pass
