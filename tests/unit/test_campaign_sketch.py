"""The campaign sketch's shortcuts give what the plain definitions give
(spamtrap.work.campaign_sketch): HTML stripped in chunks, the
densification, the hashes as a list."""

from __future__ import annotations

import zlib
from bisect import bisect_right

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.work import campaign_sketch
from spamtrap.work.campaign_sketch import (
    BINS,
    _strip,
    _strip_html,
    features,
    message_sketch,
    sketch,
)
from tests.support.campaign_samples import near_copy

# Pieces that make block markers, tags and entities, whole, split across
# pieces, unclosed, and runs of text long enough for a quiet cut.
HTML_BITS = st.sampled_from(
    [
        b"<style>",
        b"</style>",
        b"<script>",
        b"</script>",
        b"<!--",
        b"-->",
        b"<!-",
        b"->",
        b"<sty",
        b"le>",
        b"</scr",
        b"ipt>",
        b"<",
        b">",
        b"</",
        b"&",
        b"&amp;",
        b"&#123;",
        b"&abcdefghijk;",
        b";",
        b"#",
        b"-",
        b"<p>",
        b"</p>",
        b'<a href="' + b"z" * 50 + b'">',
        b"word ",
        b"x" * 40,
        b"\r\n",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(HTML_BITS, max_size=150), st.integers(1, 400), st.sampled_from([1, 40, 100]))
def test_html_stripped_in_chunks_is_a_prefix_of_the_whole(
    bits: list[bytes], need: int, chunk: int
) -> None:
    text = b"".join(bits)
    whole = _strip(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaign_sketch, "HTML_CHUNK", chunk)
        got = _strip_html(text, need)
    if len(got) < need:
        assert got == whole
    else:
        assert whole.startswith(got)


def _rotation(hashes: set[int]) -> tuple[int, ...]:
    """The densification as defined: an empty bin takes the value of the
    next full bin going round, plus the distance << 26."""
    bins: dict[int, int] = {}
    for h in hashes:
        b, v = h % BINS, h // BINS
        bins[b] = min(v, bins.get(b, v))
    full = sorted(bins)
    values = []
    for i in range(BINS):
        if i in bins:
            values.append(bins[i])
            continue
        at = bisect_right(full, i)
        ahead = full[at] if at < len(full) else full[0] + BINS
        values.append(bins[ahead % BINS] + ((ahead - i) << 26))
    return tuple(values)


@settings(max_examples=500, deadline=None)
@given(st.sets(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=200))
def test_sketch_is_the_rotation_densified_minhash(hashes: set[int]) -> None:
    assert sketch(hashes) == _rotation(hashes)
    assert sketch([*hashes, *hashes]) == sketch(hashes)  # repeats change nothing


@pytest.mark.parametrize(
    "data",
    [
        near_copy(0, 1),
        near_copy(3, 2),
        b"Subject: hi\r\n\r\n",
        b"Subject: now\r\n\r\n" + b"buy now " * 40,  # few distinct pairs: words count too
        b"Subject: x\r\n\r\n" + b"a b " * 3 + b"c d e f g h i j",
    ],
)
def test_the_message_sketch_is_the_sketch_of_the_features(data: bytes) -> None:
    assert message_sketch(data) == sketch(features(data))


@pytest.mark.parametrize(
    "text",
    [
        # The quiet run is inside a style block: the block's end is after the cut.
        b"<p>a</p><style>>" + b"y" * 40 + b"</style>" + b"z" * 100,
        # The comment ate the ">" of the cut: "<b" is closed after it.
        b"<b <!-- c -->" + b"x" * 40 + b"> tail " + b"w" * 100,
    ],
)
def test_a_cut_that_the_rest_would_change_is_refused(text: bytes) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(campaign_sketch, "HTML_CHUNK", 1)
        assert _strip_html(text, 10_000) == _strip(text)


def test_few_distinct_pairs_add_the_words() -> None:
    # 2 distinct pairs ("now buy", "buy now"): fewer than MIN_WORDS, so
    # the words themselves are features too.
    assert features(b"Subject: now\r\n\r\n" + b"buy now " * 40) == {
        zlib.crc32(b"nowbuy"),
        zlib.crc32(b"buynow"),
        zlib.crc32(b"now"),
        zlib.crc32(b"buy"),
    }
