"""Hostile message shapes (issue 11): worst cases for every built-in stage,
shared by tests/unit/test_hostile_content.py and bench/hostile.py."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

HEAD = b"From: Postmaster <postmaster@example.net>\r\nTo: <t@trap.example>\r\nSubject: hi\r\n"


NULL_HEAD = b"From: <>\r\nReturn-Path: <>\r\nSubject: x\r\n"


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return out.getvalue()


def _with_zip(data: bytes) -> bytes:
    import base64

    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="a.zip"\r\n\r\n' + b64 + b"\r\n--b--\r\n"
    )


def shapes(n: int) -> Iterator[tuple[str, bytes]]:
    """Worst cases for backtracking regexps and naive parsers, about n bytes."""
    for head_name, head in (("daemon", HEAD), ("null", NULL_HEAD)):
        yield f"blank-crlf-{head_name}", head + b"\r\n" + b"\r\n" * (n // 2)
        yield f"blank-lf-{head_name}", head + b"\n" + b"\n" * n
        yield f"ws-mix-{head_name}", head + b"\r\n" + b" \t\r\n" * (n // 4)
        yield f"spaces-{head_name}", head + b"\r\n" + b" " * n
    yield "only-blank-lines", b"\r\n" * (n // 2)
    for c in b"=<>@.-:;\"\\":
        yield f"run-{chr(c)}", HEAD + b"\r\n" + bytes([c]) * n
    yield "smtp-codes", NULL_HEAD + b"\r\n" + b" 550 5.1.1 " * (n // 11)
    yield "base64-ish", HEAD + b"Content-Transfer-Encoding: base64\r\n\r\n" + b"QUJD\r\n" * (n // 6)
    qp = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    yield "qp-ish", HEAD + qp + b"=\r\n" * (n // 3)
    yield "long-subject", b"Subject: " + b"a" * n + b"\r\n\r\nx"
    yield "long-from", b"From: " + b"mail" * (n // 4) + b"\r\n\r\nx"
    yield "from-at-runs", b"From: " + b"a@" * (n // 2) + b"\r\n\r\nx"
    yield "return-path-runs", b"Return-Path: <" + b"autoresponse-" * (n // 13) + b">\r\n\r\nx"
    yield "devnull-runs", b"Return-Path: " + b"devnull" * (n // 7) + b"\r\n\r\nx"
    yield "getresponse-runs", b"From: " + b"<bounce@." * (n // 9) + b"\r\n\r\nx"
    yield "many-headers", b"X-A: b\r\n" * (n // 8) + b"\r\nx"
    yield "no-colon-header", b"aaaa" * (n // 4)
    yield "folded", b"Subject: x\r\n" + b" \r\n" * (n // 3) + b"\r\nx"
    yield "ctype-quotes", b"Content-Type: multipart/mixed" + b'; a="' * (n // 5) + b"\r\n\r\nx"
    yield "ctype-semicolons", b"Content-Type: text/plain" + b";" * n + b"\r\n\r\nx"
    yield "disposition-names", (
        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment"
        + b"; filename*0*=a" * (n // 16) + b"\r\n\r\nx"
    )
    # 500 levels (the walks stop at 10 or 12), the innermost part padded to n.
    depth = 500
    opens = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closes = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    yield "deep-mime", opens + b"x" * max(0, n - len(opens) - len(closes)) + closes
    many = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(n // 35))
    yield "many-parts", b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + many + b"--b--\r\n"
    yield "boundary-like", (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"\r\n--bx" * (n // 5)
    )
    yield "report-parts", NULL_HEAD + (
        b'Content-Type: multipart/report; boundary="b"\r\n\r\n' + b"--b\r\n\r\n" * (n // 7)
    )
    rfc822 = b"".join(
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\ny\r\n"
        for _ in range(n // 60)
    )
    yield "many-rfc822", b"To: donor1@feeds.trap.example\r\n" + (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + rfc822 + b"--b--\r\n"
    )
    yield "zip-many-entries", _with_zip(
        _zip({f"{i}.txt": b"x" for i in range(max(1, n // 200))}, zipfile.ZIP_STORED)
    )
