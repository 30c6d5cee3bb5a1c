from __future__ import annotations

import calendar
import gzip
import io
import mailbox
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.bundle.mbox import MboxReader, entry, from_line, read_mbox

T = calendar.timegm((2026, 11, 22, 13, 31, 15))


def write(path: str, entries: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(entries))


def test_from_line_format() -> None:
    assert from_line("bot@spam.example", T) == b"From bot@spam.example Sun Nov 22 13:31:15 2026\n"


def test_from_line_pads_the_day_like_asctime() -> None:
    t = calendar.timegm((2026, 11, 2, 3, 4, 5))
    assert from_line("a@b", t) == b"From a@b Mon Nov  2 03:04:05 2026\n"


@pytest.mark.parametrize("sender", ["", "<>", "  "])
def test_null_sender_is_mailer_daemon(sender: str) -> None:
    assert from_line(sender, T).startswith(b"From MAILER-DAEMON Sun Nov 22 ")


def test_from_line_address_has_no_spaces_controls_or_8bit() -> None:
    raw = "we ird\t\x01\x7f@ex\u00e9" + b"\xff".decode("utf-8", "surrogateescape")
    line = from_line(raw, T)
    assert line == b"From we_ird___@ex__ Sun Nov 22 13:31:15 2026\n"
    # Exactly the address and the five asctime fields.
    assert len(line.split()) == 7


def test_entry_quotes_from_lines_mboxrd_and_keeps_crlf() -> None:
    msg = b"Subject: x\r\n\r\nFrom here\r\n>From there\r\n>>From far\r\nnot From \r\nFrom"
    out = entry("a@b", T, msg)
    assert out == (
        from_line("a@b", T) + b"Subject: x\r\n\r\n>From here\r\n>>From there\r\n"
        b">>>From far\r\nnot From \r\nFrom\n\n"
    )


def test_entry_quotes_a_from_line_at_the_very_start_and_the_unterminated_end() -> None:
    assert entry("a@b", T, b"From x\nFrom y") == from_line("a@b", T) + b">From x\n>From y\n\n"


def test_entry_of_terminated_message_adds_only_the_separator() -> None:
    assert entry("a@b", T, b"X: y\n\nbody\n") == from_line("a@b", T) + b"X: y\n\nbody\n\n"


MESSAGES = [
    b"Received: from x\r\nSubject: crlf\r\n\r\nFrom the start\r\n>From quoted\r\nend\r\n",
    b"Subject: bare lf\n\nline\nFrom me\n\n\n",
    b"Subject: 8bit \xe9\xff\x00\r\n\r\nbody \x80\x81 with \r bare cr\r\n",
    b"Subject: mixed\r\n\nFrom \r\n>>From x\n",
    b"\n",
]


def test_python_mailbox_reads_what_we_write(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "box")
    write(path, [entry(f"s{i}@x", T + i, m) for i, m in enumerate(MESSAGES)])
    box = mailbox.mbox(path, create=False)
    try:
        keys = box.keys()
        assert len(keys) == len(MESSAGES)
        for i, (k, m) in enumerate(zip(keys, MESSAGES, strict=True)):
            quoted = entry("s@x", T, m).split(b"\n", 1)[1][:-1]
            assert box.get_bytes(k) == quoted
            assert box[k].get_from() == f"s{i}@x Sun Nov 22 13:31:{15 + i} 2026"
    finally:
        box.close()


def test_reader_round_trip_plain_and_gzip(tmp_path: object) -> None:
    entries = [entry(f"s{i}@x", T, m) for i, m in enumerate(MESSAGES)]
    plain = os.path.join(str(tmp_path), "box")
    gz = os.path.join(str(tmp_path), "box.mbox.gz")
    write(plain, entries)
    with gzip.open(gz, "wb") as f:
        f.write(b"".join(entries))
    for path in (plain, gz):
        got = read_mbox(path)
        assert [m for _, m in got] == MESSAGES
        assert [h for h, _ in got] == [e.split(b"\n", 1)[0] for e in entries]


def test_reader_keeps_added_newline_of_unterminated_message() -> None:
    data = entry("a@b", T, b"no end") + entry("a@b", T, b"next\n")
    assert [m for _, m in MboxReader(io.BytesIO(data))] == [b"no end\n", b"next\n"]


def test_reader_rejects_data_before_first_from_line() -> None:
    with pytest.raises(ValueError, match="not an mbox"):
        list(MboxReader(io.BytesIO(b"garbage\n" + entry("a@b", T, b"x\n"))))


def test_reader_of_empty_file_yields_nothing() -> None:
    assert list(MboxReader(io.BytesIO(b""))) == []


# Lines built from pieces that stress quoting and line ends.
_line = st.lists(
    st.sampled_from([b"From ", b">From ", b">>From ", b"From", b"\r", b"x", b" ", b"\xff", b""])
    | st.binary(max_size=8),
    max_size=5,
).map(b"".join)
_message = st.lists(
    st.tuples(_line, st.sampled_from([b"\n", b"\r\n"])).map(b"".join), min_size=1, max_size=8
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, max_size=6), st.text(max_size=10))
def test_property_round_trip(tmp_path_factory: object, messages: list[bytes], sender: str) -> None:
    data = b"".join(entry(sender, T, m) for m in messages)
    assert [m for _, m in MboxReader(io.BytesIO(data))] == messages
    path = os.path.join(str(tmp_path_factory.mktemp("p")), "box")  # type: ignore[attr-defined]
    write(path, [data])
    box = mailbox.mbox(path, create=False)
    try:
        assert len(box) == len(messages)
    finally:
        box.close()
