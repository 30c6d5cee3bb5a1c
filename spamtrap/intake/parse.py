"""Parsers for SMTP command arguments, and the dialect fingerprint.

Everything here takes raw network bytes and never raises on bad input other
than returning None: spammers send anything, and a trap records it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

_KEYWORD = {
    verb: re.compile(rb"[ \t]*(" + keyword + rb")[ \t]*:[ \t]*", re.I)
    for verb, keyword in ((b"MAIL", b"FROM"), (b"RCPT", b"TO"))
}
_WS = re.compile(rb"[ \t]+")
_IP_LIKE = re.compile(rb"[0-9.]+")


@dataclass(frozen=True, slots=True)
class Path:
    address: bytes  # without brackets or source route; b"" for the null path
    params: tuple[bytes, ...]  # ESMTP parameters as sent, e.g. (b"SIZE=1234", b"BODY=8BITMIME")
    shape: bytes  # how the argument was spelled, for the fingerprint, e.g. b"FROM:<"


# Each MAIL and RCPT argument is parsed twice (for the dialect fingerprint,
# then for the command), and bots repeat theirs: keep recent results.
@functools.lru_cache(maxsize=64)
def parse_path(verb: bytes, arg: bytes) -> Path | None:
    """Parse a MAIL FROM / RCPT TO argument leniently.

    QUIRK: bots send ``FROM: <a@b>``, ``from:a@b``, ``FROM:<a@b>SIZE=1`` and
    unterminated brackets. RFC 5321 4.1.2 allows none of these; a trap accepts
    them all (architecture: "missing angle brackets") and records the
    spelling in the dialect fingerprint.
    """
    m = _KEYWORD[verb.upper()].match(arg)
    if not m:
        return None
    rest = arg[m.end() :]
    shape = arg[m.start(1) : m.end()].replace(b"\t", b" ")
    if rest.startswith(b"<"):
        shape += b"<"
        end = rest.find(b">")
        if end < 0:  # QUIRK: unterminated bracket; take the first word
            address, _, tail = rest[1:].partition(b" ")
        else:
            address, tail = rest[1:end], rest[end + 1 :]
    else:
        parts = _WS.split(rest.strip(), maxsplit=1)
        address = parts[0]
        tail = parts[1] if len(parts) > 1 else b""
    address = address.strip()
    # RFC 5321 4.1.2: a source route "@a,@b:user@host" is to be ignored.
    if address.startswith(b"@") and b":" in address:
        address = address.split(b":", 1)[1]
    return Path(address, tuple(p for p in _WS.split(tail.strip()) if p), shape)


def param_value(params: tuple[bytes, ...], name: bytes) -> bytes | None:
    for p in params:
        key, _, value = p.partition(b"=")
        if key.upper() == name:
            return value
    return None


def helo_shape(arg: bytes) -> str:
    """Classify a HELO/EHLO argument: what bots put there tells them apart."""
    a = arg.strip()
    if not a:
        return "none"
    if a.startswith(b"["):
        return "literal"
    if _IP_LIKE.fullmatch(a):
        return "ip"
    if b" " in a:
        return "words"
    if b"." in a:
        return "fqdn"
    return "word"


def bucket(seconds: float) -> str:
    """A coarse timing bucket for the fingerprint."""
    for limit, name in ((0.01, "<10ms"), (0.1, "<100ms"), (1.0, "<1s"), (10.0, "<10s")):
        if seconds < limit:
            return name
    return ">=10s"


# Spaces become "_" (their presence is the point); commas and bytes that
# are not printable ASCII become "?", keeping the field one clean token.
_PRINTABLE = bytes(95 if c == 32 else c if 33 <= c < 127 and c != 44 else 63 for c in range(256))


def _printable(b: bytes) -> str:
    return b.translate(_PRINTABLE).decode("ascii")


# Bots repeat their commands from session to session (the same EHLO, MAIL
# and RCPT arguments): keep recent tokens. 0.60 -> 0.20 us per command on the
# smtp-source session (EHLO, MAIL, RCPT, DATA, QUIT), measured 2026-12-03.
@functools.lru_cache(maxsize=256)
def command_token(verb: bytes, arg: bytes) -> str:
    """One command's token in the fingerprint: the verb as sent, and for
    HELO/EHLO the argument's shape, for MAIL/RCPT the path's spelling and
    its parameter names."""
    v = verb.upper()
    token = _printable(verb)
    if v in (b"HELO", b"EHLO"):
        token += ":" + helo_shape(arg)
    elif v in _KEYWORD:
        path = parse_path(v, arg)
        if path is None:
            token += ":?"
        else:
            token += ":" + _printable(path.shape)
            if path.params:
                keys = {_printable(p.partition(b"=")[0].upper()) for p in path.params}
                token += "+" + "+".join(sorted(keys))
    return token


@dataclass
class Dialect:
    """The SMTP dialect of one session: what researchers attribute bots with.

    ``flags`` are set by the SMTP session as it sees them: ``pipelining``,
    ``bare-lf``, ``early-talk``, ``no-helo``, ``starttls-injection``, ``relayed``,
    ``smuggling`` (an end-of-data lookalike such as LF.LF inside a CRLF
    client's DATA) and ``long-line`` (a command line over max_command_line).
    They render sorted, comma-separated, after ``flags=``.
    """

    tokens: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)

    def command(self, verb: bytes, arg: bytes) -> None:
        if len(self.tokens) < 64:  # bounded: a session can send millions of NOOPs
            self.tokens.append(command_token(verb, arg))

    def render(self) -> str:
        out = "cmds=" + ",".join(self.tokens)
        if self.flags:
            out += " flags=" + ",".join(sorted(self.flags))
        return out


def dialect_family(rendered: str) -> str:
    """A dialect as top-N lists count it (``spamtrap stats``, the dashboard).

    ``X-Spamtrap-Dialect`` lists every command of the session so far, so the
    third message of a session carries the first two transactions too, and
    a bot sending to 40 recipients has 40 RCPT tokens. The family keeps the
    commands up to the first DATA, with a run of one token written once and
    marked ``*``, and the flags: one bot, one family.
    """
    if not rendered.startswith("cmds="):
        return rendered  # not a dialect of ours: counted as it is
    cmds, _, flags = rendered.partition(" flags=")
    tokens: list[str] = []
    for token in cmds.removeprefix("cmds=").split(","):
        if tokens and tokens[-1].removesuffix("*") == token:
            tokens[-1] = token + "*"
            continue
        tokens.append(token)
        if token.upper() in ("DATA", "BDAT"):
            break
    family = "cmds=" + ",".join(tokens)
    return f"{family} flags={flags}" if flags else family
