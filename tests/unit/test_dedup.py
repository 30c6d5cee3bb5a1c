"""Exact dedup within a window, on the body and a few stable header fields."""

from __future__ import annotations

import threading

import pytest
from twisted.internet.task import Clock

from spamtrap.message import Envelope
from spamtrap.work.dedup import SLICES, Deduper, fingerprint

BODY = b"Buy cheap watches at http://spam.example/\r\n"


def env(
    to: str = "a@trap.example",
    subject: str = "cheap watches",
    sender: str = "spammer@example.net",
    body: bytes = BODY,
    date: str = "Thu, 01 Jan 2026 00:00:00 +0000",
    msg_id: str = "<1@example.net>",
    received: str = "from x by y; Thu, 01 Jan 2026 00:00:00 +0000",
) -> Envelope:
    head = (
        f"Received: {received}\r\nDate: {date}\r\nMessage-ID: {msg_id}\r\n"
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n"
    )
    return Envelope(
        msg_id=msg_id,
        received_at=0.0,
        mail_from=sender,
        rcpts=[to],
        data=head.encode() + body,
        meta={"rcpt": [f"<{to}>"], "peer": ["192.0.2.1:1234"]},
        received=["from x by node1", f"for <{to}>"],
    )


def test_copies_of_a_dictionary_attack_are_one_message() -> None:
    clock = Clock()
    dedup = Deduper(3600, clock)
    assert dedup.seen(env()) is False
    # Another trap address, relay, date, id and spamtrap metadata: a copy.
    copy = env(
        to="b@trap.example",
        date="Fri, 02 Jan 2026 00:00:00 +0000",
        msg_id="<2@example.net>",
        received="from z by w; Fri, 02 Jan 2026 00:00:00 +0000",
    )
    clock.advance(10)
    assert dedup.seen(copy) is True
    assert len(dedup) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "cheap watches!"},
        {"sender": "other@example.net"},
        {"body": BODY + b"."},
        {"body": BODY.replace(b"\r\n", b"\n")},  # exact: bytes differ
    ],
)
def test_a_different_body_subject_or_from_is_not_a_copy(change: dict[str, object]) -> None:
    dedup = Deduper(3600, Clock())
    assert dedup.seen(env()) is False
    assert dedup.seen(env(**change)) is False  # type: ignore[arg-type]
    assert len(dedup) == 2


def test_the_fingerprint_ignores_volatile_fields_but_not_their_order_of_names() -> None:
    a = env()
    b = env(to="zzz@trap.example", msg_id="<9@x>", date="Mon, 5 Jan 2026 01:02:03 +0000")
    assert fingerprint(a) == fingerprint(b)
    # A body that only looks like the Subject field is not the Subject.
    moved = Envelope("m", 0.0, "", [], b"From: spammer@example.net\r\n\r\nSubject: cheap watches")
    plain = Envelope(
        "m", 0.0, "", [], b"From: spammer@example.net\r\nSubject: cheap watches\r\n\r\n"
    )
    assert fingerprint(moved) != fingerprint(plain)


def test_forgotten_after_the_window_and_not_extended_by_copies() -> None:
    clock = Clock()
    window = 1600.0
    dedup = Deduper(window, clock)
    assert dedup.seen(env()) is False
    clock.advance(window - 1)
    assert dedup.seen(env()) is True  # still within the window of the first
    # One slice later the first sighting is forgotten, although a copy came
    # in meanwhile: the copies do not extend the window.
    clock.advance(1 + window / SLICES)
    assert dedup.seen(env()) is False
    assert dedup.seen(env()) is True


def test_expiry_frees_memory() -> None:
    clock = Clock()
    dedup = Deduper(100, clock)
    for i in range(50):
        dedup.seen(env(body=b"%d" % i))
        clock.advance(1)
    assert len(dedup) == 50
    clock.advance(200)
    dedup.seen(env(body=b"new"))
    assert len(dedup) == 1


def test_memory_is_capped_oldest_first() -> None:
    clock = Clock()
    dedup = Deduper(3200, clock, max_entries=100)
    for i in range(250):
        assert dedup.seen(env(body=b"%d" % i)) is False
        clock.advance(10)  # 20 slices of 200 s: 20 messages per slice
        assert len(dedup) <= 100
    # The newest are remembered, the oldest were dropped.
    assert dedup.seen(env(body=b"249")) is True
    assert dedup.seen(env(body=b"0")) is False


def test_a_burst_within_one_slice_stays_bounded() -> None:
    dedup = Deduper(3600, Clock(), max_entries=10)
    for i in range(35):
        dedup.seen(env(body=b"%d" % i))
        assert len(dedup) <= 10
    assert dedup.seen(env(body=b"34")) is True


def test_thread_safe_exactly_one_first_copy() -> None:
    dedup = Deduper(3600, Clock())
    messages = [env(to=f"t{i}@trap.example", body=b"%d" % (i % 50)) for i in range(2000)]
    results: list[bool] = []
    lock = threading.Lock()

    def work(chunk: list[Envelope]) -> None:
        out = [dedup.seen(m) for m in chunk]
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=work, args=(messages[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(False) == 50  # one first copy per distinct message
    assert len(dedup) == 50


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Deduper(0, Clock())
