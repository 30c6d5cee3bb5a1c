"""Stage "virus": the built-in detector, on realistic and on hostile input."""

from __future__ import annotations

import base64
import bz2
import io
import quopri
import struct
import time
import tracemalloc
import zipfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap import testing
from spamtrap.config import Config, VirusConfig
from spamtrap.filters import Discard
from spamtrap.filters.virus import EICAR, VirusStage, executable_kind, extension, make
from spamtrap.message import Envelope

# -- building messages ---------------------------------------------------------

# A minimal PE file: the DOS header points at "PE\0\0" (e_lfanew at 0x3C).
PE = b"MZ" + b"\x90" * 0x3A + struct.pack("<I", 0x80) + b"\0" * 0x40 + b"PE\0\0" + b"\0" * 200
ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 200
MACHO = b"\xcf\xfa\xed\xfe\x07\x00\x00\x01" + b"\0" * 200
MACHO_FAT = b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\0" * 200
JAVA_CLASS = b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + b"\0" * 200
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + b"0" * 2000 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"\0" * 500

HEAD = b"From: <spammer@example.net>\r\nTo: <trap@example.org>\r\nSubject: Your invoice\r\n"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def attachment(
    data: bytes,
    ctype: str = "application/octet-stream",
    disposition: str | None = 'attachment; filename="data.bin"',
    encoding: str = "base64",
) -> bytes:
    head = f"Content-Type: {ctype}\r\n"
    if disposition:
        head += f"Content-Disposition: {disposition}\r\n"
    if encoding:
        head += f"Content-Transfer-Encoding: {encoding}\r\n"
    body = b64(data) if encoding == "base64" else data
    return head.encode() + b"\r\n" + body


def multipart(*parts: bytes, boundary: str = "=_b1", subtype: str = "mixed") -> bytes:
    out = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    out += b"This is a multi-part message in MIME format.\r\n"
    for part in parts:
        out += f"\r\n--{boundary}\r\n".encode() + part
    return out + f"\r\n--{boundary}--\r\n".encode()


def message(*parts: bytes, boundary: str = "=_b1") -> bytes:
    return HEAD + b"MIME-Version: 1.0\r\n" + multipart(*parts, boundary=boundary)


def text(body: bytes = b"Dear friend, please see the attached invoice.\r\n") -> bytes:
    return b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body


def zip_of(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return out.getvalue()


def with_zip(data: bytes, name: str = "documents.zip") -> bytes:
    return message(text(), attachment(data, "application/zip", f'attachment; filename="{name}"'))


def raw_zip(name: bytes, compressed: bytes, size: int, crc: int = 0, method: int = 8) -> bytes:
    """A one-entry zip around an already compressed stream."""
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(compressed), size,
        len(name), 0,
    ) + name  # fmt: skip
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(compressed),
        size, len(name), 0, 0, 0, 0, 0, 0,
    ) + name  # fmt: skip
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(compressed), 0
    )
    return local + compressed + central + end


def deflate_bomb(gib: int = 1) -> bytes:
    """A zip whose one entry inflates to ``gib`` GiB of zeros (about 1 MiB).

    Built from one full-flushed block repeated, so it costs nothing to make.
    It is never read to its end, so its CRC is left at 0.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return raw_zip(b"zeros.txt", block * 1024 * gib + c.flush(), 1024 * gib << 20)


def scan(data: bytes, cfg: VirusConfig | None = None) -> str | None:
    verdict = VirusStage(cfg or VirusConfig())(
        Envelope("t1", 0.0, "spammer@example.net", ["trap@example.org"], data)
    )
    assert verdict is None or isinstance(verdict, Discard)
    return verdict.reason if verdict else None


# -- EICAR ---------------------------------------------------------------------


def test_eicar_in_a_plain_body() -> None:
    assert scan(HEAD + b"\r\nHello,\r\n" + EICAR + b"\r\nBye\r\n") == "eicar"


def test_eicar_in_a_base64_attachment() -> None:
    data = message(text(), attachment(EICAR, disposition='attachment; filename="eicar.com.txt"'))
    assert EICAR not in data
    assert scan(data) == "eicar"


def test_eicar_in_a_base64_text_body_far_from_the_start() -> None:
    body = b"Lorem ipsum dolor sit amet. " * 500 + EICAR
    part = attachment(body, "text/plain; charset=us-ascii", disposition=None)
    assert scan(message(part)) == "eicar"


def test_eicar_in_a_quoted_printable_body_split_by_a_soft_break() -> None:
    encoded = quopri.encodestring(b"x" * 40 + EICAR)  # lines of 76: a soft break inside
    assert EICAR not in encoded
    part = attachment(encoded, "text/plain", None, "quoted-printable")
    assert scan(message(part)) == "eicar"


# -- executables by magic bytes ----------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [(PE, "pe"), (ELF, "elf"), (MACHO, "macho"), (MACHO_FAT, "macho")],
)
def test_executable_magic_in_a_mislabelled_attachment(data: bytes, kind: str) -> None:
    part = attachment(data, "application/pdf", 'attachment; filename="invoice.pdf"')
    assert scan(message(text(), part)) == f"executable:{kind}"


def test_pe_header_beyond_the_first_kib_is_found() -> None:
    far = b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x2100) + b"\0" * (0x2100 - 0x40) + b"PE\0\0"
    assert executable_kind(far) == "pe"
    assert scan(message(attachment(far + b"\0" * 100))) == "executable:pe"


@pytest.mark.parametrize(
    "data",
    [
        b"MZ is the best band in the world. Tickets inside!\r\n" * 20,
        b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x80) + b"\0" * 300,  # DOS stub, no PE
        b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0xFFFFFFFF),  # e_lfanew points nowhere
        JAVA_CLASS,
    ],
)
def test_look_alikes_are_not_executables(data: bytes) -> None:
    assert executable_kind(data) is None
    assert scan(message(text(), attachment(data))) is None


def test_executable_in_a_text_part_is_found() -> None:
    part = attachment(PE, "text/plain", 'attachment; filename="readme.txt"')
    assert scan(message(part)) == "executable:pe"


# -- dangerous file names ----------------------------------------------------


OCTET = "application/octet-stream"


@pytest.mark.parametrize(
    ("disposition", "ctype", "reason"),
    [
        ('attachment; filename="invoice.pdf.exe"', OCTET, "extension:exe"),
        ('attachment; filename="PAYMENT.SCR"', OCTET, "extension:scr"),
        ('attachment; filename="order.exe. . "', OCTET, "extension:exe"),
        ("attachment; filename*=UTF-8''Rechnung%20M%C3%A4rz%2Epdf%2Ejs", OCTET, "extension:js"),
        ('attachment; filename*0="invoice.pdf"; filename*1=".vbs"', OCTET, "extension:vbs"),
        ("attachment; filename*0*=UTF-8''scan%20of; filename*1*=%2Elnk", OCTET, "extension:lnk"),
        ('attachment; filename="=?utf-8?B?ZmFrdHVyYS5leGU=?="', OCTET, "extension:exe"),
        (None, 'application/x-iso9660-image; name="disk.ISO"', "extension:iso"),
        ('attachment; filename="C:\\Temp\\setup.msi"', OCTET, "extension:msi"),
        # A client shows the RFC 2231 name; the plain one is a decoy.
        ("attachment; filename=\"a.pdf\"; filename*=utf-8''a.hta", "text/plain", "extension:hta"),
    ],
)
def test_dangerous_file_names(disposition: str | None, ctype: str, reason: str) -> None:
    part = attachment(b"harmless bytes", ctype, disposition)
    assert scan(message(text(), part)) == reason


@pytest.mark.parametrize(
    "name", ["invoice.exe.pdf", "exe", "notes_about.exe_files.txt", "photo.jpeg", ".profile"]
)
def test_harmless_file_names(name: str) -> None:
    part = attachment(b"harmless bytes", disposition=f'attachment; filename="{name}"')
    assert scan(message(text(), part)) is None


def test_extension_normalisation() -> None:
    assert extension("A.B.EXE") == "exe"
    assert extension("x.exe\0") == "exe"
    assert extension("dir/x.exe/") == ""
    assert extension("README") == ""


def test_configured_extensions_replace_the_default() -> None:
    cfg = VirusConfig(extensions=["pdf"])
    named = attachment(b"x", disposition='attachment; filename="a.PDF"')
    assert scan(message(named), cfg) == "extension:pdf"
    exe = attachment(b"x", disposition='attachment; filename="a.exe"')
    assert scan(message(exe), cfg) is None


# -- zip archives -------------------------------------------------------------


def test_zip_holding_eicar() -> None:
    assert scan(with_zip(zip_of({"docs/readme.txt": EICAR}))) == "zip:eicar"


def test_zip_holding_an_exe_by_name_and_by_content() -> None:
    assert scan(with_zip(zip_of({"Invoice.PDF.exe": b"junk"}))) == "zip:extension:exe"
    assert scan(with_zip(zip_of({"data.bin": PE}))) == "zip:executable:pe"


def test_zip_inside_a_zip() -> None:
    inner_eicar = zip_of({"eicar.txt": EICAR})
    assert scan(with_zip(zip_of({"more.zip": inner_eicar}))) == "zip:zip:eicar"
    inner_exe = zip_of({"setup.exe": b"junk"}, zipfile.ZIP_STORED)
    assert scan(with_zip(zip_of({"inner.dat": inner_exe}))) == "zip:zip:extension:exe"


def test_zip_is_found_by_magic_not_by_name() -> None:
    assert scan(with_zip(zip_of({"a.scr": b"x"}), name="photo.jpg")) == "zip:extension:scr"
    assert scan(with_zip(b"not a zip at all", name="archive.zip")) is None


def nested_zip(depth: int, leaf: dict[str, bytes]) -> bytes:
    """``depth`` zips, each holding the next; the innermost holds ``leaf``."""
    data = zip_of(leaf)
    for i in range(depth - 1):
        data = zip_of({f"level{depth - 1 - i}.zip": data})
    return data


def test_zip_depth_limit() -> None:
    three = nested_zip(3, {"e.txt": EICAR})
    # Depth 3 with a limit of 2: the zip that was not opened is the verdict.
    assert scan(with_zip(three), VirusConfig(max_zip_depth=2)) == "zip-limit:depth"
    assert scan(with_zip(three), VirusConfig(max_zip_depth=3)) == "zip:zip:zip:eicar"
    # 0 switches zip opening off: nothing is judged inside.
    assert scan(with_zip(zip_of({"e.txt": EICAR})), VirusConfig(max_zip_depth=0)) is None


def test_exe_four_zips_deep_is_caught_by_the_depth_limit() -> None:
    deep = with_zip(nested_zip(4, {"setup.exe": b"junk"}))
    assert scan(deep) == "zip-limit:depth"
    # A clean zip in a zip (depth 2, the default limit) still passes.
    assert scan(with_zip(nested_zip(2, {"readme.txt": b"hello"}))) is None


def test_zip_quine_stops_at_the_depth_limit() -> None:
    # A zip quine unpacks to itself forever; any chain of nested zips that
    # goes on past the limit (here the same stored bytes nested 50 times, and
    # a zip whose entry is a copy of its own zip) is judged by the limit.
    chain = zip_of({"r.txt": b"r"}, zipfile.ZIP_STORED)
    for _ in range(50):
        chain = zip_of({"r.zip": chain}, zipfile.ZIP_STORED)
    assert scan(with_zip(chain)) == "zip-limit:depth"
    inner = zip_of({"r.zip": zip_of({"r.zip": b"PK\x03\x04"})}, zipfile.ZIP_STORED)
    selfish = zip_of({"r.zip": inner, "r2.zip": inner}, zipfile.ZIP_STORED)
    started = time.process_time()
    assert scan(with_zip(selfish)) == "zip-limit:depth"
    assert time.process_time() - started < 0.5


def test_zip_entry_limit() -> None:
    entries = {f"page{i}.txt": b"hello" for i in range(5)}
    entries["run.exe"] = b"x"
    assert scan(with_zip(zip_of(entries)), VirusConfig(max_zip_entries=5)) == "zip-limit:entries"
    assert scan(with_zip(zip_of(entries)), VirusConfig(max_zip_entries=6)) == "zip:extension:exe"
    five = dict(list(entries.items())[:5])
    assert scan(with_zip(zip_of(five)), VirusConfig(max_zip_entries=5)) is None


def test_exe_as_entry_1002_is_caught_by_the_entry_limit() -> None:
    entries = {f"page{i}.txt": b"hello" for i in range(1001)}
    entries["run.exe"] = b"x"
    assert scan(with_zip(zip_of(entries, zipfile.ZIP_STORED))) == "zip-limit:entries"
    del entries["run.exe"]
    del entries["page1000.txt"]  # exactly 1,000 harmless entries: clean
    assert scan(with_zip(zip_of(entries, zipfile.ZIP_STORED))) is None


def test_inner_zip_larger_than_the_byte_budget_is_a_limit() -> None:
    inner = zip_of({"pad.bin": b"\xaa" * 20000, "e.txt": EICAR}, zipfile.ZIP_STORED)
    outer = with_zip(zip_of({"inner.zip": inner}))
    assert scan(outer, VirusConfig(max_zip_bytes=10000)) == "zip-limit:bytes"
    assert scan(outer, VirusConfig(max_zip_bytes=30000)) == "zip:zip:eicar"


def test_byte_budget_spent_before_a_later_entry() -> None:
    # Four stored zips of ~8 KiB each: the budget runs out inside the third.
    inner = zip_of({"pad.bin": bytes(range(256)) * 32}, zipfile.ZIP_STORED)
    outer = zip_of({f"i{i}.zip": inner for i in range(4)}, zipfile.ZIP_STORED)
    assert scan(with_zip(outer), VirusConfig(max_zip_bytes=20000)) == "zip-limit:bytes"
    assert scan(with_zip(outer), VirusConfig(max_zip_bytes=100000)) is None


def test_ordinary_compression_ratios_pass() -> None:
    # 20 MiB of repetitive log text compresses ~ 30:1, below the bomb ratio.
    words = b" ".join(b"%d GET /index.html 200 %d" % (i, i * 7919 % 100003) for i in range(10**6))
    logs = zip_of({"access.log": words[: 20 << 20]})
    assert scan(with_zip(logs)) is None


def test_encrypted_entry_is_judged_by_name_only() -> None:
    data = bytearray(zip_of({"secret.exe": PE, "secret.txt": EICAR}))
    # Set the "encrypted" flag in every local and central header.
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(sig, at + 4)
    assert scan(with_zip(bytes(data))) == "zip:extension:exe"
    only_text = bytes(data).replace(b"secret.exe", b"secret.doc")
    assert scan(with_zip(only_text)) is None


def test_zip_bomb_is_a_limit_and_costs_nothing() -> None:
    bomb = deflate_bomb()  # 1 GiB of zeros in about 1 MiB
    nested = zip_of({f"part{i}.zip": bomb for i in range(4)}, zipfile.ZIP_DEFLATED)
    for data in (with_zip(bomb), with_zip(nested)):
        tracemalloc.start()
        started = time.monotonic()
        try:
            assert scan(data) == "zip-limit:ratio"
            took = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Inflating it all takes seconds (and 1 GiB, if read at once).
        assert took < 0.5
        assert peak < 48 << 20


def test_bomb_that_understates_its_size_is_not_inflated() -> None:
    # It says 1 KiB (no bomb ratio): only its head is read, and its lie is no verdict.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    liar = raw_zip(b"zeros.txt", block * 256 + c.flush(), 1024)
    started = time.process_time()
    assert scan(with_zip(liar)) is None
    assert time.process_time() - started < 0.5


def test_bzip2_bomb_is_not_inflated() -> None:
    # zipfile inflates a bzip2 chunk without an output bound: never read one.
    bomb = zip_of({"zeros.txt": b"\0" * (32 << 20)}, zipfile.ZIP_BZIP2)
    assert len(bomb) < 1000
    tracemalloc.start()
    try:
        assert scan(with_zip(bomb)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    named = zip_of({"x.js": bz2.compress(b"x")}, zipfile.ZIP_BZIP2)
    assert scan(with_zip(named)) == "zip:extension:js"


@pytest.mark.parametrize(
    "data",
    [
        b"PK\x03\x04" + b"\xff" * 300,
        zip_of({"a.txt": b"hello" * 100})[:-30],  # the central directory cut off
        zip_of({"a.txt": b"hello" * 100}).replace(b"hello", b"HELLO", 1),  # bad data
        raw_zip(b"a.txt", b"\xff\xfe\xfd" * 10, 100),  # not a deflate stream
        raw_zip(b"a.txt", b"", 100, method=99),  # AES / unknown method
    ],
)
def test_corrupt_zip_gives_no_verdict(data: bytes) -> None:
    assert scan(with_zip(data)) is None


# -- forwarded messages -------------------------------------------------------


@pytest.mark.parametrize("encoding", ["7bit", "base64"])
def test_exe_inside_an_attached_message(encoding: str) -> None:
    inner = HEAD + multipart(text(), attachment(b"x", disposition='attachment; filename="a.exe"'))
    part = attachment(inner, "message/rfc822", "attachment", encoding)
    assert scan(message(text(), part, boundary="outer")) == "extension:exe"


def test_eicar_in_plain_text_inside_a_base64_attached_message() -> None:
    inner = HEAD + b"\r\nPlease scan this:\r\n" + EICAR + b"\r\n"
    part = attachment(inner, "message/rfc822", "attachment", "base64")
    assert EICAR not in message(part)
    assert scan(message(text(), part)) == "eicar"


# -- hostile MIME -------------------------------------------------------------


def test_broken_base64_still_decodes_what_it_can() -> None:
    noisy = b"!!" + b64(PE).replace(b"\r\n", b"\r\n*** \r\n")[:-7]  # junk, bad padding
    part = b"Content-Transfer-Encoding: base64\r\n\r\n" + noisy
    assert scan(message(part)) == "executable:pe"
    garbage = b"Content-Transfer-Encoding: base64\r\n\r\n%%%%\x00\xff===AAA=A"
    assert scan(message(garbage)) is None


def test_multipart_without_a_boundary() -> None:
    data = HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n" + attachment(PE)
    assert scan(data) is None  # no verdict, no exception
    no_delimiters = HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\nhello\r\n'
    assert scan(no_delimiters) is None


def test_ten_thousand_tiny_parts() -> None:
    tiny = [b"Content-Type: text/plain\r\n\r\nx"] * 10_000
    started = time.monotonic()
    assert scan(message(*tiny)) is None
    assert time.monotonic() - started < 2
    early = [tiny[0]] * 5 + [attachment(b"x", disposition="attachment; filename=a.exe")]
    assert scan(message(*early, *tiny)) == "extension:exe"


def test_deep_nesting() -> None:
    data = attachment(PE, disposition=None)
    for i in range(3000):
        data = multipart(data, boundary=f"b{i}")
    assert scan(HEAD + data) is None  # beyond the depth limit: not looked at
    shallow = attachment(PE, disposition=None)
    for i in range(5):
        shallow = multipart(shallow, boundary=f"b{i}")
    assert scan(HEAD + shallow) == "executable:pe"


def test_nul_bytes() -> None:
    data = HEAD.replace(b"Subject", b"Sub\0ject") + b"\r\n\0\0body\0" * 100
    assert scan(data) is None
    part = attachment(b"x", disposition='attachment; filename="run.exe\0"')
    assert scan(message(text(b"\0" * 50), part)) == "extension:exe"


@pytest.mark.parametrize(
    "disposition",
    [
        "attachment; filename*" + "9" * 5000 + "*=utf-8''a.exe",  # int() refuses 4,300+ digits
        'attachment; filename="' * 20000,
        "attachment; filename*=" + "%" * 50000,
        'attachment; filename="=?utf-8?B?' + "=?" * 20000 + '"',
    ],
)
def test_hostile_name_parameters(disposition: str) -> None:
    started = time.monotonic()
    assert scan(message(attachment(b"x", disposition=disposition))) is None
    assert time.monotonic() - started < 1


# -- clean mail ---------------------------------------------------------------


def test_clean_messages_pass() -> None:
    html = b"<html><body><h1>Cheap meds</h1><p>MZ Pharmacy: " + b"<b>buy</b> " * 300
    html_part = attachment(html, "text/html; charset=utf-8", None)
    alternative = multipart(
        text(b"Cheap meds! " * 100), html_part, boundary="alt", subtype="alternative"
    )
    clean = [
        HEAD + b"\r\nWin a prize! Click http://example.net/x\r\n",
        message(alternative),
        message(text(), attachment(PDF, "application/pdf", 'attachment; filename="invoice.pdf"')),
        message(text(), attachment(PNG, "image/png", 'inline; filename="logo.png"')),
        with_zip(zip_of({"invoice.pdf": PDF, "logo.png": PNG}), "invoice.zip"),
    ]  # fmt: skip
    for data in clean:
        assert scan(data) is None


def test_make_follows_the_config() -> None:
    cfg = Config()
    stage = make(cfg, reactor=None)
    assert stage is not None
    assert stage(Envelope("t", 0.0, "", ["t@example.org"], HEAD + b"\r\n" + EICAR)) == Discard(
        "eicar"
    )
    cfg = testing.config(cfg, filters__virus__enabled=False)
    assert make(cfg, reactor=None) is None


# -- properties ---------------------------------------------------------------

SEEDS = [EICAR, PE, ELF, MACHO_FAT, b"PK\x03\x04", zip_of({"a.exe": b"x"}), zip_of({"e": EICAR})]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        seed = draw(st.sampled_from(SEEDS))
        cut = draw(st.integers(0, len(seed)))
        body = seed[:cut] + body if draw(st.booleans()) else seed + body
    return body


def leaves() -> st.SearchStrategy[bytes]:
    headers = st.lists(
        st.sampled_from(
            [
                "Content-Type: application/zip",
                "Content-Type: text/plain",
                "Content-Type: message/rfc822",
                'Content-Type: multipart/mixed; boundary="x"',
                "Content-Type: text/html; name*0*=utf-8''a; name*1=.exe",
                "Content-Transfer-Encoding: base64",
                "Content-Transfer-Encoding: quoted-printable",
                'Content-Disposition: attachment; filename="=?x-bad?Q?a=2Eexe?="',
                "Content-Disposition: attachment; filename*=bad''%ZZ.e%78e",
                "Content-Disposition: attachment; filename*0*=\0'; filename*5=",
            ]
        ),
        max_size=4,
    )

    def build(lines: list[str], body: bytes, encode: bool) -> bytes:
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b64(body) if encode else body)

    return st.builds(build, headers, bodies(), st.booleans())


def trees() -> st.SearchStrategy[bytes]:
    def wrap(parts: list[bytes], boundary: str, close: bool) -> bytes:
        data = multipart(*parts, boundary=boundary) if boundary else b"".join(parts)
        return data if close else data[: len(data) // 2]

    return st.recursive(
        leaves(),
        lambda inner: st.builds(
            wrap, st.lists(inner, max_size=4), st.sampled_from(["x", "=_b1", ""]), st.booleans()
        ),
        max_leaves=12,
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = scan(data)
    assert result is None or isinstance(result, str)


@settings(max_examples=300, deadline=None)
@given(trees())
def test_arbitrary_mime_never_raises(data: bytes) -> None:
    result = scan(HEAD + data)
    assert result is None or isinstance(result, str)
