"""Campaign assignment: near-copies share an id, campaigns do not, and the
index stays within its bounds of count and time."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.campaign import (
    MAX_KEYS,
    CampaignAssigner,
    CampaignIndex,
    campaign_id,
)
from spamtrap.work.campaign_sketch import (
    BINS,
    EMPTY,
    _strip_html,
    _top_fields,
    band_keys,
    features,
    message_sketch,
    similarity,
    sketch,
)
from tests.support.campaign_samples import TEMPLATES, near_copy
from tests.support.hostile import shapes


def index(clock: Clock | None = None, **kw: float) -> CampaignIndex:
    return CampaignIndex(clock or Clock(), **kw)  # type: ignore[arg-type]


def assign(idx: CampaignIndex, data: bytes) -> str:
    return idx.assign(message_sketch(data)).campaign


# -- assignment -----------------------------------------------------------------


def test_near_copies_share_an_id_and_campaigns_do_not() -> None:
    idx = index()
    ids = {t: {assign(idx, near_copy(t, n)) for n in range(12)} for t in range(len(TEMPLATES))}
    assert all(len(found) == 1 for found in ids.values()), ids
    assert len({next(iter(found)) for found in ids.values()}) == len(TEMPLATES)
    assert len(idx) == len(TEMPLATES)


def test_transfer_encoding_and_html_do_not_split_a_campaign() -> None:
    idx = index()
    plain = assign(idx, near_copy(0, 1))
    assert assign(idx, near_copy(0, 2, encoding="base64")) == plain
    html = assign(idx, near_copy(0, 3, html=True))
    assert assign(idx, near_copy(0, 4, html=True, encoding="base64")) == html
    assert assign(idx, near_copy(1, 1)) != plain


def test_volatile_headers_and_numbers_are_not_features() -> None:
    a = near_copy(2, 1)
    b = a.replace(b"Message-ID: <", b"Message-ID: <zz").replace(b"Order ref 1", b"Order ref 9")
    b = b.replace(b"Date: ", b"Date: Sun, 01 Jan 2034 ") + b"extra line 12345\r\n"
    assert similarity(message_sketch(a), message_sketch(b)) >= 0.9
    # Received lines and the rest of the header are never read.
    assert features(b"Received: from a.example\r\n" + a) == features(a)


def test_ids_come_from_the_content_only() -> None:
    # Two processes, or a restarted one, name a campaign whose first copy
    # reads the same alike: the id is a digest of the sketch, which uses
    # crc32, never Python's per-process hash() of bytes.
    message = near_copy(3, 7)
    assert campaign_id(message_sketch(message)) == assign(index(), message)
    assert assign(index(), message) == assign(index(), message)
    assert campaign_id(message_sketch(b"Subject: hello\r\n\r\nhello world\r\n")) == (
        "35ce9182d6820da2"
    )


def test_a_message_without_text_still_gets_a_campaign() -> None:
    idx = index()
    empty = assign(idx, b"")
    assert assign(idx, b"\r\n") == empty
    assert message_sketch(b"") == (EMPTY,) * BINS
    image = (
        b"Content-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(bytes(range(256)) * 8)
    )
    assert assign(idx, image) == assign(idx, b"To: x@trap.example\r\n" + image) != empty


def test_short_texts_and_text_without_spaces_are_sketched() -> None:
    cjk = "今日だけの特別価格でお届けします限定セールをお見逃しなく".encode()
    one = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + cjk
    other = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + cjk[::-1]
    assert len(features(one)) > 8
    assert similarity(message_sketch(one), message_sketch(one + b"!")) > 0.8
    assert similarity(message_sketch(one), message_sketch(other)) < 0.3


def test_utf16_text_reads_like_utf8() -> None:
    text = TEMPLATES[4]
    utf8 = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
    utf16 = b"Content-Type: text/plain; charset=utf-16\r\n\r\n" + text.encode("utf-16")
    assert features(utf8) == features(utf16)


def test_sketch_agrees_on_a_bin_exactly_when_the_minimum_is_shared() -> None:
    few = {0x100, 0x201}  # bins 0 and 1 only: the rest borrow from them
    s = sketch(few)
    assert s[0] == 0x100 >> 6 and s[1] == 0x201 >> 6
    # An empty bin borrows the next full one's value, plus the distance.
    assert s[2] == (0x100 >> 6) + (62 << 26) and s[63] == (0x100 >> 6) + (1 << 26)
    last = sketch({0x13F})  # bin 63 alone: every other bin wraps round to it
    assert last[63] == 4 and last[0] == 4 + (63 << 26) and last[62] == 4 + (1 << 26)
    assert all(v != EMPTY for v in s)
    assert sketch(few) == s and sketch(list(few)[::-1]) == s
    assert similarity(s, s) == 1.0
    assert len(band_keys(s)) == len(set(band_keys(s)))  # each band its own key


# -- bounds ---------------------------------------------------------------------------


def test_the_least_recently_seen_campaign_goes_first() -> None:
    idx = index(max_campaigns=3)
    first = [assign(idx, near_copy(t, 0)) for t in range(3)]
    assert idx.assign(message_sketch(near_copy(0, 1))).new is False  # template 0 seen again
    assign(idx, near_copy(3, 0))  # a fourth: template 1, the least recent, goes
    assert len(idx) == 3 and idx.forgotten == 1
    assert idx.assign(message_sketch(near_copy(0, 2))).new is False
    again = idx.assign(message_sketch(near_copy(1, 0)))
    assert again.new is True and again.campaign == first[1]  # the same content, the same id
    assert len(idx) == 3
    assert idx.band_entries <= 3 * MAX_KEYS


def test_band_keys_per_campaign_are_bounded() -> None:
    idx = index()
    for n in range(200):
        assign(idx, near_copy(4, n))
    assert len(idx) == 1
    assert idx.band_entries <= MAX_KEYS


def test_a_campaign_not_seen_for_the_window_is_forgotten() -> None:
    clock = Clock()
    idx = index(clock, window=3600)
    first = idx.assign(message_sketch(near_copy(1, 0)))
    assert first.new
    clock.advance(3599)
    assert not idx.assign(message_sketch(near_copy(1, 1))).new  # seen: the window starts again
    clock.advance(3599)
    assert not idx.assign(message_sketch(near_copy(1, 2))).new
    assign(idx, near_copy(2, 0))
    clock.advance(3600)
    idx.expire()
    assert len(idx) == 0 and idx.band_entries == 0
    later = idx.assign(message_sketch(near_copy(1, 3)))
    assert later.new


def test_bad_bounds_are_refused() -> None:
    for kw in ({"window": 0.0}, {"max_campaigns": 0}):
        try:
            index(**kw)
        except ValueError:
            continue
        raise AssertionError(f"accepted {kw}")


# -- the assigner ---------------------------------------------------------------------


def test_the_assigner_sets_the_metadata_field_and_counts() -> None:
    metrics = Metrics()
    assigner = CampaignAssigner(index(), metrics)
    envs = [
        Envelope(f"m{n}", 1.0, "", ["x@trap.example"], near_copy(n % 2, n), meta={})
        for n in range(6)
    ]
    ids = [assigner.assign(env) for env in envs]
    assert [env.meta["campaign"] for env in envs] == [[i] for i in ids]
    assert len(set(ids)) == 2
    block = envs[0].header_block("\n").decode()
    assert f"X-Spamtrap-Campaign: {ids[0]}\n" in block
    text = metrics.render().decode()
    assert "spamtrap_campaigns_new_total 2.0" in text
    assert "spamtrap_campaigns_tracked 2.0" in text


# -- hostile input ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    s = message_sketch(data)
    assert len(s) == BINS and all(0 <= v <= EMPTY for v in s)
    assert assign(index(), data) == campaign_id(s)


MIME_BITS = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: text/html; charset=utf-16\r\n",
        b"Content-Type: text/plain; charset=x-unknown-charset\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Subject: =?utf-8?B?not base64?= =?x?q?=ZZ?=\r\n",
        b"\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"<style>p{}</style><p>hi</p><!-- x",
        b"=C3=A9=\r\n",
        b"\xff\xfe\x00h\x00i",
        b"word another word 12345 a1b2c3\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(MIME_BITS, max_size=30))
def test_broken_mime_never_crashes(bits: list[bytes]) -> None:
    data = b"".join(bits)
    assert len(message_sketch(data)) == BINS


def test_threads_sharing_the_index_keep_it_consistent() -> None:
    # The pipeline's pool threads share one index; eviction under contention.
    idx = index(max_campaigns=3)
    sketches = [message_sketch(near_copy(n % 5, n)) for n in range(100)]

    def work(offset: int) -> list[str]:
        return [idx.assign(sketches[(i + offset) % 100]).campaign for i in range(300)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    assert all(len(r) == 300 for r in results)
    assert len(idx) <= 3
    remembered = set(idx._recent.values())
    assert set(idx._bands.values()) <= remembered  # no band points to a forgotten campaign
    assert idx.band_entries == sum(len(c.keys) for c in remembered)


# -- linear time on hostile content (as tests/unit/test_hostile_content.py) ----------

HTML = b"Content-Type: text/html\r\n\r\n"


@functools.lru_cache(maxsize=3)
def _hostile(n: int) -> dict[str, bytes]:
    ours = [
        ("html-lt-runs", HTML + b"<" * n),
        ("html-open-comments", HTML + b"<!--" * (n // 4)),
        ("html-open-styles", HTML + b"<style>a" * (n // 8)),
        ("html-tags", HTML + b"<b>x</b>" * (n // 8)),
        ("subject-like-names", b"subjectx: y\r\n" * (n // 13) + b"Subject: hi\r\n\r\nx"),
        ("encoded-subject", b"Subject: " + b"=?utf-8?q?" * (n // 10) + b"\r\n\r\nx"),
        ("words", b"\r\n" + b"ab cd 12 " * (n // 9)),
    ]
    return dict(ours + list(shapes(n)))


def _cpu(data: bytes, repeat: int = 3, f: Callable[[bytes], object] = message_sketch) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        f(data)
        best = min(best, time.process_time() - started)
    return best


def _grows_linearly(f: Callable[[bytes], object], small: bytes, large: bytes) -> bool:
    """cost(4N) / cost(N) < 8: linear is about 4, quadratic 16."""
    big = _cpu(large, f=f)
    return big < 0.004 or big / max(_cpu(small, f=f), 0.0005) < 8  # below 4 ms: noise


@pytest.mark.parametrize("name", list(_hostile(1024)))
def test_the_sketch_is_linear_and_bounded_on_hostile_content(name: str) -> None:
    small, large, huge = (_hostile(n)[name] for n in (16 * 1024, 64 * 1024, 1 << 20))
    # A 4 KiB message takes about 0.1 ms; the stages' bound is 0.25 s.
    assert _cpu(huge, repeat=1) < 0.15, f"{name}: {len(huge)} bytes"
    assert _grows_linearly(message_sketch, small, large), name


@pytest.mark.parametrize(
    "unit", [b"<", b"<!--", b"<style>a", b"<script", b"<b>x</b>", b"&amp", b"&#", b"< >"]
)
def test_html_stripping_is_linear_inside_its_window(unit: bytes) -> None:
    # The message is cut before HTML is stripped, so a quadratic pattern
    # (a tag running on over later "<", a block never closed) would hide
    # under the cut in the test above: measure the stripping itself.
    small, large = (unit * (n // len(unit)) for n in (8 * 1024, 32 * 1024))
    assert _grows_linearly(_strip_html, small, large)


def test_top_fields_are_found_in_linear_time() -> None:
    unit = b"subjectx: y\r\n content-type\r\n"
    small, large = (unit * (n // len(unit)) for n in (64 * 1024, 256 * 1024))
    assert _grows_linearly(_top_fields, small, large)
