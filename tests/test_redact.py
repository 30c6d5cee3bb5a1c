"""Trap-address redaction.

The checks read the redacted message with Python's email package (an
independent MIME and RFC 2047 decoder), not with spamtrap's own walker: a
trap address must be gone from the raw bytes, from every decoded header and
from every decoded part, while every other address is still there.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import quopri
import re
from email.message import EmailMessage
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.config import FeedConfig, TrapConfig
from spamtrap.message import Envelope
from spamtrap.redact import mask, redact, redact_envelope

TRAP_DOMAINS = ["trap.example", "Second-Trap.example"]
TRAP_ADDRESSES = ["spamtrap@example.org"]
FEED = FeedConfig(id="donor", address="feed1@donor.example")
RCPT = "catchme@catchall.example"  # a catch-all trap: known only from RCPT TO
ALL_TRAPS = [*TRAP_ADDRESSES, FEED.address, RCPT]

# Trap addresses as they appear in the message below, and what they become.
TRAPS_IN_MESSAGE = [
    "x@trap.example",
    "Jane.Doe-99@TRAP.example",
    "spamtrap@example.org",
    "SpamTrap@Example.ORG",
    "feed1@donor.example",
    "catchme@catchall.example",
    "info@second-trap.example",
    "someone@trap.example",
]
# Not traps: other domains, or other local parts at a trap address's domain.
OTHERS = [
    "bob@other.example",
    "alice@example.org",
    "xspamtrap@example.org",
    "spamtrap@example.org.evil.example",
    "feed2@donor.example",
    "user@trap.example.net",
]


def is_trap(address: str) -> bool:
    local, _, domain = address.lower().rpartition("@")
    return domain in {d.lower() for d in TRAP_DOMAINS} or address.lower() in ALL_TRAPS


def trap_pattern() -> re.Pattern[str]:
    """Any trap address (case-insensitive), as text, however delimited."""
    full = "|".join(re.escape(a) for a in ALL_TRAPS)
    domains = "|".join(re.escape(d) for d in TRAP_DOMAINS)
    return re.compile(
        rf"(?<![\w.+-])(?:{full})(?![\w-]|\.\w)|[\w.+'-]*(?:@|%40)(?:{domains})(?![\w-]|\.\w)", re.I
    )


TRAP_RE = trap_pattern()


def every_text(data: bytes) -> list[str]:
    """The raw bytes, every decoded header value and every decoded part,
    as Python's email package reads them."""
    texts = [data.decode("latin-1")]
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        for name, value in part.items():
            texts.append(f"{name}: {value}")  # RFC 2047 decoded by the policy
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            texts.append(payload.decode("utf-8", "replace"))
    return texts


def count(texts: list[str], address: str) -> int:
    pattern = re.compile(rf"(?<![\w.+-]){re.escape(address)}(?![\w-]|\.\w)")
    return sum(len(pattern.findall(t)) for t in texts)


def masked(address: str) -> str:
    return mask(address.encode()).decode()


HTML = (
    "<p>Dear <a href='mailto:x@trap.example'>x@trap.example</a>,</p>\n"
    "<p>unsubscribe: http://spam.example/u?e=someone%40trap.example&amp;x=1</p>\n"
    "<p>contact bob@other.example or alice@example.org</p>\n" * 3
)
PLAIN = (
    "Hello Jane.Doe-99@TRAP.example, your friend SpamTrap@Example.ORG sent this.\n"
    "Reply to bob@other.example, not xspamtrap@example.org.\n"
    "Visit spamtrap@example.org.evil.example today. " + "filler " * 30 + "\n"
    "Also info@second-trap.example and user@trap.example.net.\n"
)


def build_message() -> bytes:
    """A spam with trap addresses in every place redaction must reach."""
    msg = EmailMessage()
    msg["Received"] = "from relay (relay [192.0.2.1]) by mx; for <feed1@donor.example>"
    msg["Delivered-To"] = "feed1@donor.example"
    msg["From"] = "Bob <bob@other.example>"
    msg["To"] = "Jäne Doe <Jane.Doe-99@TRAP.example>, catchme@catchall.example"
    msg["Cc"] = "feed2@donor.example"
    msg["Subject"] = "Angebot für·someone@trap.example, spamtrap@example.org, alice@example.org"
    msg.set_content(PLAIN, cte="quoted-printable")
    msg.add_alternative(HTML, subtype="html", cte="base64")
    inner = EmailMessage()
    inner["From"] = "catchme@catchall.example"
    inner["To"] = "x@trap.example"
    inner["Subject"] = "forwarded"
    inner.set_content("inner body for someone@trap.example from bob@other.example\n")
    msg.add_attachment(inner)
    msg.add_attachment(
        b"list: info@second-trap.example, alice@example.org\n",
        maintype="application",
        subtype="octet-stream",
        filename="list.txt",
    )
    data = msg.as_bytes(policy=email.policy.SMTP)
    # A preamble (never decoded by anything, still in the bytes).
    boundary = msg.get_boundary()
    assert boundary is not None
    marker = f"--{boundary}".encode()
    return data.replace(marker, b"preamble for x@trap.example\r\n" + marker, 1)


def redact_message(data: bytes) -> bytes:
    return redact(data, [*TRAP_ADDRESSES, FEED.address, RCPT], TRAP_DOMAINS)


def test_every_trap_address_is_gone_and_every_other_address_stays() -> None:
    original = build_message()
    texts = every_text(original)
    # The test message really has them all, raw and decoded.
    assert all(count(texts, a) for a in TRAPS_IN_MESSAGE)
    # Some only where they must be decoded: an encoded word, a base64 part.
    header = original.split(b"\r\n\r\n")[0]
    subject = email.message_from_bytes(original, policy=email.policy.default)["Subject"]
    assert "someone@trap.example" in subject and b"someone" not in header
    assert b"someone%40trap.example" not in original

    result = redact_message(original)
    after = every_text(result)
    found = [m.group(0) for t in after for m in TRAP_RE.finditer(t)]
    assert found == []
    for address in OTHERS:
        assert count(after, address) == count(texts, address), address
    for address in TRAPS_IN_MESSAGE:
        assert count(after, masked(address)) >= 1, address


def test_structure_and_length_are_kept() -> None:
    original = build_message()
    result = redact_message(original)
    assert len(result) == len(original)
    before = email.message_from_bytes(original, policy=email.policy.default)
    after = email.message_from_bytes(result, policy=email.policy.default)
    shapes = [
        (p.get_content_type(), p.get("content-transfer-encoding"), len(p.keys()))
        for p in before.walk()
    ]
    assert [
        (p.get_content_type(), p.get("content-transfer-encoding"), len(p.keys()))
        for p in after.walk()
    ] == shapes
    assert all(not p.defects for p in after.walk())


def first_parts(data: bytes) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for part in email.message_from_bytes(data, policy=email.policy.default).walk():
        parts.setdefault(part.get_content_type(), part)  # the first of each type
    return parts


def test_quoted_printable_and_base64_parts_re_encode_validly() -> None:
    original = build_message()
    parts = first_parts(redact_message(original))

    plain = parts["text/plain"]
    raw_qp = str(plain.get_payload(decode=False)).encode("ascii")
    before = str(first_parts(original)["text/plain"].get_payload(decode=False))
    # Every line as long as it was (soft breaks where they were).
    assert [len(line) for line in raw_qp.splitlines()] == [len(x) for x in before.splitlines()]
    expected = PLAIN
    for address in ("Jane.Doe-99@TRAP.example", "SpamTrap@Example.ORG", "info@second-trap.example"):
        expected = expected.replace(address, masked(address))
    assert quopri.decodestring(raw_qp).decode().replace("\r\n", "\n") == expected

    html = parts["text/html"]
    raw_b64 = str(html.get_payload(decode=False)).encode("ascii")
    lines = raw_b64.splitlines()
    assert all(len(line) <= 76 for line in lines)
    assert all(len(line) == 76 for line in lines[:-1])
    decoded = base64.b64decode(b"".join(lines), validate=True).decode()
    expected = HTML.replace("x@trap.example", "x@xxxx.xxxxxxx").replace(
        "someone%40trap.example", "xxxxxxx%40xxxx.xxxxxxx"
    )
    assert decoded.replace("\r\n", "\n") == expected


def test_raw_and_qp_literal_occurrences_keep_length_and_every_other_byte() -> None:
    data = (
        b"To: <Trap1@Trap.Example>\r\nSubject: hi spamtrap@example.org!\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Write to x@trap.example or bob@other.example =3D more=\r\n"
        b" and a split sp=\r\namtrap@exam=\r\nple.org and =46eed1=40donor.example.\r\n"
    )
    result = redact_message(data)
    assert len(result) == len(data)
    changed = [i for i in range(len(data)) if data[i] != result[i]]
    expected = (
        b"To: <xxxx1@xxxx.xxxxxxx>\r\nSubject: hi xxxxxxxx@xxxxxxx.xxx!\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Write to x@xxxx.xxxxxxx or bob@other.example =3D more=\r\n"
        b" and a split xx=\r\nxxxxxx@xxxx=\r\nxxx.xxx and =78xxx1=40xxxxx.xxxxxxx.\r\n"
    )
    assert result == expected
    # Only bytes of the trap addresses changed.
    assert all(chr(data[i]).isalnum() for i in changed)


def test_encoded_words_are_decoded_and_re_encoded() -> None:
    b_word = base64.b64encode("für trap@trap.example".encode()).decode()
    q_word = "=?iso-8859-1?Q?f=FCr_x=40TRAP=2Eexample?="
    data = f"Subject: =?utf-8?B?{b_word}?= and {q_word}\r\n\r\nbody\r\n".encode()
    result = redact_message(data)
    subject = email.message_from_bytes(result, policy=email.policy.default)["Subject"]
    assert subject == "für xxxx@xxxx.xxxxxxx and für x@xxxx.xxxxxxx"
    assert len(result) == len(data)


def test_base64_with_other_line_length_keeps_it() -> None:
    text = ("mail x@trap.example now " * 10).encode()
    encoded = base64.encodebytes(text).replace(b"\n", b"")
    body = b"\r\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64)) + b"\r\n"
    data = b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    result = redact_message(data)
    head, _, new_body = result.partition(b"\r\n\r\n")
    lines = new_body.split(b"\r\n")
    assert [len(line) for line in lines] == [len(line) for line in body.split(b"\r\n")]
    assert binascii.a2b_base64(b"".join(lines)) == text.replace(
        b"x@trap.example", b"x@xxxx.xxxxxxx"
    )


def test_messages_without_traps_are_returned_unchanged() -> None:
    data = build_message().replace(b"trap", b"tarp")
    assert redact(data, ["spamtrap@example.org"], []) is not None
    assert redact(data, [], []) == data
    clean = b"From: bob@other.example\r\n\r\nhello alice@example.org\r\n"
    assert redact_message(clean) == clean


# --- envelopes --------------------------------------------------------------------


def envelope() -> Envelope:
    return Envelope(
        msg_id="id1",
        received_at=1767225600.0,
        mail_from="spamtrap@example.org",
        rcpts=[RCPT, "x@trap.example"],
        data=build_message(),
        feed=None,
        meta={
            "peer": ["192.0.2.1:4321"],
            "helo": ["[192.0.2.1]"],
            "mail_from": ["<spamtrap@example.org> SIZE=1000"],
            "rcpt": [f"<{RCPT}>", "<x@trap.example> NOTIFY=NEVER"],
            "domain": ["catchall.example", "trap.example"],
        },
        received_line=(
            "from relay (relay [192.0.2.1])\r\n\tby node1 with ESMTP id id1\r\n"
            f"\tfor <{RCPT}>; Thu, 01 Jan 2026 00:00:00 +0000"
        ),
    )


def test_redact_envelope_covers_metadata_received_line_and_rcpt_to() -> None:
    traps = TrapConfig(domains=TRAP_DOMAINS, addresses=TRAP_ADDRESSES, catch_all=True)
    env = envelope()
    original = env.full_bytes()
    result = redact_envelope(env, traps, [FEED])
    out = result.full_bytes()
    assert env.full_bytes() == original  # a copy; the daemon's envelope stays
    assert len(out) == len(original)
    assert [m.group(0) for t in every_text(out) for m in TRAP_RE.finditer(t)] == []
    assert b"catchall.example" not in out  # the recipient domains too
    assert result.meta["peer"] == ["192.0.2.1:4321"]
    assert result.meta["helo"] == ["[192.0.2.1]"]
    assert result.meta["mail_from"] == ["<xxxxxxxx@xxxxxxx.xxx> SIZE=1000"]
    assert result.meta["domain"] == ["xxxxxxxx.xxxxxxx", "xxxx.xxxxxxx"]
    assert result.mail_from == "xxxxxxxx@xxxxxxx.xxx"
    assert result.rcpts == ["xxxxxxx@xxxxxxxx.xxxxxxx", "x@xxxx.xxxxxxx"]
    assert "by node1 with ESMTP id id1" in result.received_line
    assert count(every_text(result.data), "bob@other.example") == count(
        every_text(env.data), "bob@other.example"
    )


# --- properties ---------------------------------------------------------------------

SEPARATORS = ' <>,;:()"\n\t\r'
FILLER = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="@%=?"),
    max_size=12,
)
LOCAL = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789._+-", min_size=1, max_size=10
).filter(lambda s: s[0].isalnum())
PROP_DOMAINS = ["trap.example", "t2.example"]
PROP_ADDRESSES = ["single@example.org", "Second.One@example.net"]


@st.composite
def address_piece(draw: Any) -> tuple[str, bool]:
    """(an address as written, whether it is a trap address)."""
    kind = draw(st.sampled_from(["full", "domain", "other", "near"]))
    sep = draw(st.sampled_from(["@", "%40"]))
    if kind == "full":
        local, domain = draw(st.sampled_from(PROP_ADDRESSES)).split("@")
    elif kind == "domain":
        local, domain = draw(LOCAL), draw(st.sampled_from(PROP_DOMAINS))
    elif kind == "other":
        local, domain = draw(LOCAL), draw(st.sampled_from(["other.example", "trap.example.com"]))
    else:  # another local part at a trap address's domain: not a trap
        local = draw(LOCAL.filter(lambda s: s.lower() not in ("single", "second.one")))
        domain = draw(st.sampled_from(["example.org", "example.net"]))
    flips = draw(
        st.lists(st.booleans(), min_size=len(local + domain), max_size=len(local + domain))
    )
    text = "".join(c.swapcase() if f else c for c, f in zip(local + domain, flips, strict=True))
    local, domain = text[: len(local)], text[len(local) :]
    return local + sep + domain, kind in ("full", "domain")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            FILLER, st.sampled_from(SEPARATORS), address_piece(), st.sampled_from(SEPARATORS)
        ),
        max_size=8,
    ),
    FILLER,
)
def test_property_traps_removed_everything_else_kept(
    pieces: list[tuple[str, str, tuple[str, bool], str]], tail: str
) -> None:
    text, expected = [], []
    for filler, before, (address, trap), after in pieces:
        text += [filler, before, address, after]
        if trap:
            local, sep, domain = re.split("(@|%40)", address, maxsplit=1)
            address = masked(local) + sep + masked(domain)
        expected += [filler, before, address, after]
    data = ("".join(text) + tail).encode()
    result = redact(data, PROP_ADDRESSES, PROP_DOMAINS)
    assert result == ("".join(expected) + tail).encode()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\r\n",
                    b"Content-Transfer-Encoding: base64\r\n",
                    b"Content-Transfer-Encoding: quoted-printable\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"\r\n--b\r\n",
                    b"--b--\r\n",
                    b"\r\n",
                    b"x@trap.example",
                    b"eEB0cmFwLmV4YW1wbGU=",  # base64 of it
                    b"x=40trap.exam=\r\nple",
                    b"=?utf-8?Q?x=40trap.example?=",
                ]
            ),
        ),
        max_size=20,
    )
)
def test_property_any_bytes_never_raise_and_redaction_is_idempotent(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    once = redact(data, ["single@example.org"], ["trap.example"])
    assert redact(once, ["single@example.org"], ["trap.example"]) == once
    assert re.search(rb"(?<![\w.+-])x@trap\.example(?![\w-]|\.\w)", once, re.I) is None
