"""Who really sent a message that came through a trusted MX relay.

Behind MX delegation (a Postfix or Exim in front of the trap) the SMTP peer
is the relay, not the bot. A relay says who its client was in one of two
ways, and this module reads both:

- Postfix's XFORWARD and XCLIENT commands (www.postfix.org/XFORWARD_README
  and XCLIENT_README): ``XFORWARD NAME=bot.example ADDR=192.0.2.7 ...``,
  values xtext-encoded (RFC 3461 4), ``[UNAVAILABLE]`` / ``[TEMPUNAVAIL]``
  for what the relay does not know, IPv6 addresses prefixed ``IPV6:``;
- the relay's own Received line, the first one of the message (the relay
  prepends it), and those under it while they name trusted hops, read the
  way SpamAssassin's trusted_networks parsing does
  (Mail::SpamAssassin::Message::Metadata::Received): Postfix and Sendmail
  write ``from HELO (RDNS [IP])``, Exim ``from RDNS ([IP]:PORT helo=HELO)``
  or ``from [IP] (helo=HELO)``, qmail ``from RDNS (HELO helo) (IP)``.

Only peers in ``smtp.trusted_relays`` are listened to (the SMTP side checks
that); anyone else could forge a client this way.

Values come back raw, CR and LF included (no escaping: the header block
does that, visibly). The Received parse reads a bounded prefix of the
message and runs in linear time, without regular expressions, because it
runs in the reactor at the end of DATA.

Behind a chain of relays (Postfix -> amavis -> Postfix, or two MX hosts)
the top Received line names the previous hop, not the bot. As
SpamAssassin's trusted_networks walk does, :func:`derive_client` reads down
the Received lines while the from-address is a trusted hop (the caller
says which: smtp.trusted_relays and loopback) and takes the first
untrusted one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# What the EHLO reply advertises (Postfix's attribute sets).
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
XCLIENT_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")

_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
# Postfix sends NAME=unknown when its own reverse lookup failed.
_NO_NAME = ("unknown", "softdnserr", "")
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
_TOKEN_CHARS = frozenset(chr(c) for c in range(33, 127))
_HEX = "0123456789abcdefABCDEF"

# The Received parse looks only at this much of the message, and at this
# much of the field: the relay's line is at the very top and short.
MAX_HEADER_SCAN = 16 * 1024
MAX_FIELD = 2048


class RelayCommandError(ValueError):
    """A bad XFORWARD/XCLIENT argument; ``reply`` is the SMTP reply text."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Client:
    """The original client, as a relay described it."""

    addr: str | None = None  # an IP address, normalised; None: unknown
    port: int = 0  # 0: unknown
    name: str | None = None  # its reverse DNS as the relay saw it; None: unknown
    helo: str | None = None
    proto: str | None = None  # SMTP, ESMTP, ... as the relay received it
    ident: str | None = None  # the relay's queue id (XFORWARD IDENT)
    source: str | None = None  # LOCAL or REMOTE (XFORWARD SOURCE)
    login: str | None = None  # SASL login at the relay (XCLIENT LOGIN)
    destaddr: str | None = None  # the address the client connected to (XCLIENT)
    destport: int = 0

    def copy(self) -> Client:
        return dataclasses.replace(self)


def as_text(b: bytes) -> str:
    """Bytes from the wire as text; undecodable bytes survive as surrogates.
    Raw, line feeds included: the header block escapes them (evidence)."""
    return b.decode("utf-8", "surrogateescape")


def xtext_decode(value: bytes) -> bytes:
    """RFC 3461 4 xtext: ``+XX`` is the byte 0xXX. Raises ValueError."""
    if b"+" not in value:
        return value
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == 0x2B:  # "+"
            hexpair = value[i + 1 : i + 3]
            # QUIRK: RFC 3461 wants upper-case hex; accept either case.
            if len(hexpair) != 2 or any(chr(h) not in _HEX for h in hexpair):
                raise ValueError(f"bad xtext escape at offset {i}")
            out.append(int(hexpair, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def parse_attributes(verb: str, arg: bytes, allowed: tuple[str, ...]) -> dict[str, bytes | None]:
    """``NAME=value ...`` -> {NAME: decoded value, or None when unavailable}.

    Names are case-insensitive; a later one wins. Raises RelayCommandError
    with Postfix's wording for what Postfix refuses too.
    """
    words = arg.split()
    if not words:
        raise RelayCommandError(f"5.5.4 Syntax: {verb} attribute=value...")
    attrs: dict[str, bytes | None] = {}
    for word in words:
        raw_name, eq, raw_value = word.partition(b"=")
        if not eq or not raw_name:
            raise RelayCommandError(f"5.5.4 Syntax: {verb} attribute=value...")
        name = raw_name.decode("ascii", "replace").upper()
        if name not in allowed:
            raise RelayCommandError(f"5.5.4 Bad {verb} attribute name: {_shown(raw_name)}")
        try:
            value = xtext_decode(raw_value)
        except ValueError as e:
            raise RelayCommandError(f"5.5.4 Bad {name} syntax: {e}") from None
        if value.decode("ascii", "replace").upper() in _UNAVAILABLE:
            attrs[name] = None
        else:
            attrs[name] = value
    return attrs


def _shown(b: bytes) -> str:
    # For a reply line: printable ASCII only, and short.
    return "".join(c if c in _TOKEN_CHARS else "?" for c in b[:64].decode("ascii", "replace"))


def normalise_ip(text: str) -> str | None:
    """An IP address as written by an MTA (``IPV6:`` prefix, IPv4-mapped
    IPv6), normalised; None if it is not one."""
    if text[:5].upper() == "IPV6:":
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _port(name: str, value: bytes) -> int:
    if not value.isdigit() or len(value) > 5 or int(value) > 65535:
        raise RelayCommandError(f"5.5.4 Bad {name} syntax: {_shown(value)}")
    return int(value)


def apply(client: Client, attrs: dict[str, bytes | None]) -> None:
    """Store parsed attributes in ``client``; raises RelayCommandError on a
    bad value (apply to a copy: a refused command changes nothing)."""
    for name, value in attrs.items():
        if name in ("ADDR", "DESTADDR"):
            ip = None
            if value is not None:
                ip = normalise_ip(value.decode("ascii", "replace"))
                if ip is None:
                    raise RelayCommandError(f"5.5.4 Bad {name} syntax: {_shown(value)}")
            if name == "ADDR":
                client.addr = ip
            else:
                client.destaddr = ip
        elif name in ("PORT", "DESTPORT"):
            port = 0 if value is None else _port(name, value)
            if name == "PORT":
                client.port = port
            else:
                client.destport = port
        elif name == "PROTO":
            if value is not None and (
                len(value) > 64 or not all(chr(c) in _TOKEN_CHARS for c in value)
            ):
                raise RelayCommandError(f"5.5.4 Bad PROTO syntax: {_shown(value)}")
            client.proto = None if value is None else value.decode("ascii")
        elif name == "NAME":
            # As Postfix: a name that is not a hostname is "unknown".
            text = "" if value is None else as_text(value)
            ok = text.lower() not in _NO_NAME and all(c in _HOSTNAME_CHARS for c in text)
            client.name = text if ok else None
        elif name == "HELO":
            client.helo = as_text(value) if value else None
        elif name == "IDENT":
            client.ident = as_text(value) if value else None
        elif name == "SOURCE":
            client.source = as_text(value).upper() if value else None
        elif name == "LOGIN":
            client.login = as_text(value) if value else None


# -- the relay's Received line --------------------------------------------------


# At most this many Received lines are walked down (a chain of trusted hops
# longer than this is not a relay setup).
MAX_HOPS = 16


def received_values(content: bytes) -> Iterator[str]:
    """The unfolded values of the Received fields of the header section, top
    first. Reads at most MAX_HEADER_SCAN bytes; each value is capped at
    MAX_FIELD characters. Line-ending CRs go; a CR inside a line stays."""
    head = content[:MAX_HEADER_SCAN]
    n = len(head)
    pos = 0
    while pos < n:
        nl = head.find(b"\n", pos)
        end = n if nl < 0 else nl
        line = head[pos:end]
        if line in (b"", b"\r"):
            return  # the end of the header section
        pos = end + 1
        if line[:9].lower() == b"received:":
            parts = [line[9:]]
            total = len(line)
            while pos < n and head[pos] in (0x20, 0x09):
                nl = head.find(b"\n", pos)
                e = n if nl < 0 else nl
                if total < MAX_FIELD:
                    parts.append(head[pos:e])
                    total += e - pos
                pos = e + 1
            value = b" ".join(part.strip(b" \t\r") for part in parts)[:MAX_FIELD]
            yield as_text(value)


def top_received(content: bytes) -> str | None:
    """The unfolded value of the first Received field (see received_values)."""
    return next(received_values(content), None)


def _split_from_part(s: str) -> tuple[str, list[str], str]:
    """``HOST (c1) (c2 (nested)) by ...`` -> (HOST, [comments], the rest)."""
    n = len(s)
    i = 0
    while i < n and s[i] not in " \t(":
        i += 1
    host = s[:i]
    comments: list[str] = []
    depth = 0
    start = 0
    while i < n:
        c = s[i]
        if c == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if depth == 0:
                comments.append(s[start:i])
        elif depth == 0:
            if c == ";":
                break
            # "by" as a word at depth 0 ends the from-part
            if (
                c in "bB"
                and s[i + 1 : i + 2] in ("y", "Y")
                and s[i - 1 : i] in (" ", "\t", ")")
                and s[i + 2 : i + 3] in (" ", "\t", "")
            ):
                break
        i += 1
    else:
        if depth:  # an unclosed comment runs to the end
            comments.append(s[start:])
    return host, comments, s[i:]


def _bracketed(text: str) -> tuple[str | None, str, int]:
    """In ``NAME [IP]:PORT ...``: (the IP, what stands before it, the port)."""
    j = text.find("[")
    if j < 0:
        return None, "", 0
    k = text.find("]", j)
    if k < 0:
        return None, "", 0
    ip = normalise_ip(text[j + 1 : k])
    port = 0
    if text[k + 1 : k + 2] == ":":
        digits = text[k + 2 : k + 8].split(" ", 1)[0]
        if digits.isdigit() and int(digits) <= 65535:
            port = int(digits)
    return ip, text[:j].strip(), port


def _rdns(name: str) -> str | None:
    # "user@host" and "IDENT:user@host" are Sendmail's ident forms.
    name = name.rpartition("@")[2].strip()
    if name.lower() in _NO_NAME or not all(c in _HOSTNAME_CHARS for c in name):
        return None
    return name


def parse_received(value: str) -> Client | None:
    """The client that a Received field's ``from`` part names, or None."""
    s = value.strip()
    if s[:4].lower() != "from" or s[4:5] not in (" ", "\t", "("):
        return None
    host, comments, rest = _split_from_part(s[4:].lstrip())
    exim = "exim" in rest.lower()
    ip: str | None = None
    port = 0
    before = ""
    kind = ""
    helo_eq: str | None = None  # Exim's helo=
    helo_word: str | None = None  # qmail's and CommuniGate's "(HELO name)"
    for comment in comments:
        for word in comment.split():
            low = word.lower()
            if low.startswith("helo="):
                helo_eq = word[5:].rstrip(",")
            elif low.startswith("port=") and word[5:].isdigit() and int(word[5:]) <= 65535:
                port = port or int(word[5:])
        head = comment.strip()
        if head[:5].upper() in ("HELO ", "EHLO "):
            helo_word = head[5:].strip() or None
            continue
        if ip is None:
            found, before, found_port = _bracketed(comment)
            if found is not None:
                ip, port, kind = found, found_port or port, "bracket"
                continue
            bare = normalise_ip(head.rpartition("@")[2]) if " " not in head else None
            if bare is not None:  # qmail: (1.2.3.4) or (user@1.2.3.4)
                ip, kind = bare, "bare"
    if ip is None and host.startswith("["):  # Exim without rDNS: from [IP] (helo=x)
        ip, _, port_ = _bracketed(host)
        port = port_ or port
        if ip is None:
            return None
        return Client(addr=ip, port=port, helo=helo_eq or helo_word)
    if ip is None:
        return None
    client = Client(addr=ip, port=port)
    if kind == "bracket" and before:
        # Postfix, Sendmail: from HELO (RDNS [IP])
        client.name = _rdns(before)
        client.helo = host or None
    elif kind == "bracket":
        if helo_eq is not None or exim:
            # Exim: from RDNS ([IP] helo=HELO), the name verified; no helo=
            # when the HELO was that name.
            client.name = _rdns(host) if not host.startswith("[") else None
            client.helo = helo_eq if helo_eq is not None else (host or None)
        else:
            # from HELO ([IP]): Sendmail without rDNS, Exchange
            client.helo = host or None
    else:
        # qmail: from RDNS (HELO helo) (IP)
        client.name = _rdns(host)
        client.helo = helo_word if helo_word is not None else (host or None)
    return client


def derive_client(
    content: bytes, trusted: Callable[[str], bool] | None = None
) -> Client | None:
    """The client named by the message's Received lines, or None.

    The top line names the relay's client. While that client's address is a
    trusted hop (``trusted``, e.g. another relay or a content filter over
    loopback), the next line down is read instead, at most MAX_HOPS lines
    and MAX_HEADER_SCAN bytes; the first untrusted one is the client. When
    the lines run out (or one names no client) first, the last client read
    is the answer: the innermost hop known. None if the top line names none.
    """
    found: Client | None = None
    for hops, value in enumerate(received_values(content)):
        client = parse_received(value)
        if client is None:
            break
        found = client
        if trusted is None or hops + 1 >= MAX_HOPS or not trusted(client.addr or ""):
            break
    return found
