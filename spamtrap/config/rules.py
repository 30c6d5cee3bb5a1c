"""Leaf rules of the configuration: a YAML scalar's value -> a field's value.

Each parser raises ValueError with a message for the operator. A field's
rule is declared on the field itself (``field(metadata=rule(...))`` in
spamtrap.config.schema) and read by the walker in spamtrap.config.walker;
fields without one get the default parser for their type.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

from spamtrap.message import META_FIELDS
from spamtrap.regex_safety import compile_safe

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# What one process does (Config.role, twistd spamtrap --role).
ROLES = ("all", "listener", "worker")

# -- sizes and durations -----------------------------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 * GIB}
_DURATION_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w))+\s*", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_INT = 2**63 - 1  # what the OS and file formats downstream can hold


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512", "64KiB", "8MiB", "4M", "10k".

    Units are always binary (k = KiB = 1024), whatever the spelling: a limit
    that is 2% larger than meant harms nobody, an ambiguity table does.
    Raises ValueError.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            if value.strip().startswith("-"):
                raise ValueError(f"must not be negative, got {value!r}")
            raise ValueError(f"not a size: {value!r} (use e.g. 512, 64KiB, 8MiB, 1GiB)")
        exact = Fraction(m[1]) * _SIZE_UNITS[m[2] and m[2].lower()]
        if exact.denominator != 1:
            raise ValueError(f"not a whole number of bytes: {value!r}")
        n = int(exact)
    else:
        raise ValueError(f"expected a size such as 512, 64KiB or 8MiB, got {_describe(value)}")
    if n < 0:
        raise ValueError(f"must not be negative, got {n}")
    if n > _MAX_INT:
        raise ValueError(f"too large: {value!r}")
    return n


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "5m", "1h30m", "2d", "500ms".

    Raises ValueError.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(
                float(n) * _DURATION_UNITS[unit.lower()] for n, unit in _DURATION_PART.findall(text)
            )
        elif text.startswith("-"):
            raise ValueError(f"must not be negative, got {value!r}")
        else:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30, 90s, 5m, 1h, 2d, 500ms)")
    else:
        raise ValueError(f"expected a duration such as 90s, 5m or 1h, got {_describe(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


# -- leaf parsers: a YAML scalar's Python value -> the field's value -----------
#
# Each raises ValueError with a message for the operator. Non-scalar nodes
# arrive as a _Shape, so "expected X, got a list" comes out of the same code.

Parser = Callable[[Any], Any]


class _Shape:
    def __init__(self, kind: str) -> None:
        self.kind = kind


def _describe(value: object) -> str:
    if isinstance(value, _Shape):
        return value.kind
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    return f"a {type(value).__name__}"


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _nonempty(value: object) -> str:
    s = _string(value)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _integer(minimum: int = 0) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if value > _MAX_INT:
            raise ValueError(f"too large: {value}")
        return value

    return parse


def _size(minimum: int = 1) -> Parser:
    def parse(value: object) -> int:
        n = parse_size(value)
        if n < minimum:
            raise ValueError(f"must be at least {minimum} bytes, got {value!r}")
        return n

    return parse


def _duration(positive: bool = False) -> Parser:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be more than 0, got {value!r}")
        return seconds

    return parse


def _regex(value: object) -> re.Pattern[str]:
    s = _string(value)
    try:
        # Also refuses shapes that backtrack catastrophically (docs/stages.md).
        return compile_safe(s, re.IGNORECASE)
    except (re.error, OverflowError, ValueError) as e:
        raise ValueError(f"bad regular expression {s!r}: {e}")
    except RecursionError:
        raise ValueError(f"bad regular expression {s[:40]!r}...: nested too deeply")


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The node name is one dot-separated part of every bundle key, so no dots.
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_LABEL_RE = re.compile(r"[^\s@<>()\[\]\\,;:\"/]+")
_HEADER_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII, no colon
_ENDPOINT_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]*")


def _name(value: object) -> str:
    s = _string(value)
    if not _NAME_RE.fullmatch(s):
        raise ValueError(f"bad name {s!r}: use letters, digits, '_', '.', '-' (not first)")
    return s


def _node_name(value: object) -> str:
    s = _string(value)
    if not _NODE_RE.fullmatch(s):
        raise ValueError(
            f"bad node name {s!r}: use letters, digits, '_', '-' (no dots: it is part of"
            " dot-separated bundle names)"
        )
    return s


def _domain(value: object) -> str:
    s = _string(value).lower().rstrip(".")
    if "@" in s:
        raise ValueError(f"{value!r} is an address, not a domain name")
    if not s or not all(_LABEL_RE.fullmatch(label) for label in s.split(".")):
        raise ValueError(f"not a domain name: {value!r}")
    return s


def _hostname(value: object) -> str:
    _domain(value)
    return _string(value)


def _received_host(value: object) -> str:
    # The by-host of a Received line: a domain name or an address literal
    # ("[192.0.2.1]"), compared without case or trailing dot.
    s = _string(value).strip().lower().rstrip(".")
    if s.startswith("[") and s.endswith("]"):
        try:
            ipaddress.ip_address(s[1:-1].removeprefix("ipv6:"))
        except ValueError:
            raise ValueError(f"not an address literal: {value!r} (e.g. '[192.0.2.1]')")
        return s
    return _domain(s)


def _address(value: object) -> str:
    s = _string(value).lower()
    local, at, domain = s.rpartition("@")
    if not at or not local or any(c.isspace() or c in "<>" for c in local):
        raise ValueError(f"not an address: {value!r} (expected local@domain)")
    try:
        domain = _domain(domain)
    except ValueError:
        raise ValueError(f"not an address: {value!r} (bad domain part)")
    return f"{local}@{domain}"


def _split_endpoint(rest: str) -> list[str]:
    # Twisted's description syntax: ':'-separated, backslash escapes a colon.
    parts: list[str] = []
    current, chars = "", iter(rest)
    for c in chars:
        if c == "\\":
            current += next(chars, "")
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    return [*parts, current]


def _endpoint(value: object) -> str:
    # A full parse needs a reactor (serverFromString), so check the form here
    # and the port of the common TCP kinds; the daemon reports the rest.
    if not isinstance(value, str):
        raise ValueError(f"expected an endpoint such as 'tcp:2525', got {_describe(value)}")
    kind, colon, rest = value.partition(":")
    if not colon or not rest or not _ENDPOINT_TYPE_RE.fullmatch(kind):
        raise ValueError(
            f"not an endpoint description: {value!r} (expected TYPE:ARGS, e.g. 'tcp:2525'"
            " or 'tcp:25:interface=127.0.0.1')"
        )
    if kind.lower() in ("tcp", "tcp6", "ssl"):
        args = _split_endpoint(rest)
        named = dict(a.split("=", 1) for a in args if "=" in a)
        positional = [a for a in args if "=" not in a]
        port = named.get("port", positional[0] if positional else "")
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise ValueError(f"bad port in endpoint {value!r}: expected 0-65535")
    return value


def _network(value: object) -> str:
    s = _string(value)
    try:
        return str(ipaddress.ip_network(s))
    except ValueError as e:
        raise ValueError(f"not a network (CIDR): {e}")


def _http_url(value: object) -> str:
    s = _string(value)
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {s!r}")
    return s


def _base_url(value: object) -> str:
    # A public URL is a base that keys are appended to (URL/bundles/<key>,
    # URL/<prefix>/<key>): a query, a fragment or a space would break them.
    s = _http_url(value)
    parts = urlsplit(s)
    if parts.query or parts.fragment or "?" in s or "#" in s:
        raise ValueError(f"a base URL takes no query or fragment, got {s!r}")
    if not s.isprintable() or any(c.isspace() for c in s):
        raise ValueError(f"a base URL takes no spaces or control characters, got {s!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {s!r}")
    return s


def parse_redis_url(value: object) -> str:
    text = _nonempty(value)
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://host[:port][/db] or rediss://..., got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database in {text!r} must be a number")
    return text


def _store_url(value: object) -> str:
    s = _string(value)
    parts = urlsplit(s)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path[:1] == "/":
        if parts.query or parts.fragment:
            raise ValueError(f"a file URL takes no query or fragment, got {s!r}")
        return s
    if parts.scheme == "s3" and parts.netloc and not any(c.isspace() for c in s):
        return s
    raise ValueError(f"expected file:///absolute/path or s3://bucket/prefix, got {s!r}")


def _header_name(value: object) -> str:
    s = _string(value)
    if not _HEADER_RE.fullmatch(s):
        raise ValueError(f"not a header field name: {s!r} (no colon, no spaces)")
    return s


_OWN_META_RE = re.compile(r"x_[a-z0-9_]+")


def _meta_field(value: object) -> str:
    s = _string(value)
    # x_ names are added by stages (the operator's own, or feeds' x_stripped).
    if s not in META_FIELDS and not _OWN_META_RE.fullmatch(s):
        raise ValueError(_unknown("metadata field", s, list(META_FIELDS)))
    return s


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        s = _string(value)
        if s not in choices:
            raise ValueError(_unknown("value", s, list(choices)))
        return s

    return parse


DASHBOARD_ACCESS = ("open", "token", "off")


def _dashboard_access(value: object) -> str:
    # YAML 1.1 reads a bare off as false: it means "off" here.
    if value is False:
        return "off"
    return _choice(*DASHBOARD_ACCESS)(value)


def _role(value: object) -> str:
    s = _string(value)
    if s not in ROLES:
        close = difflib.get_close_matches(s, ROLES, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown role {s!r}: takes one of {', '.join(ROLES)}{hint}")
    return s


def _extension(value: object) -> str:
    s = _string(value).strip().lower().lstrip(".")
    if not s or "." in s or "/" in s:
        raise ValueError(f"not a file name extension: {value!r} (e.g. 'exe')")
    return s


_CALLABLE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _callable_path(value: object) -> str:
    s = _string(value)
    if not _CALLABLE_RE.fullmatch(s):
        raise ValueError(f"expected 'package.module:callable', got {s!r}")
    return s


def _port(value: object) -> int:
    n: int = _integer(1)(value)
    if n > 65535:
        raise ValueError(f"not a port: {n}")
    return n


def _rate(value: object) -> float:
    # Messages per second, e.g. 0.5 or 20; 0 = unlimited.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"expected messages per second (a number, 0 = unlimited), got {_describe(value)}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number at least 0, got {value}")
    return float(value)


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} {name!r}; did you mean {close[0]!r}?"
    return f"unknown {what} {name!r} (known: {', '.join(known)})"


# -- a field's rule ----------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one field is read, beyond its type's default parser."""

    parse: Parser | None = None  # for a list field: applied to each item
    one_or_many: bool = False  # a single string is a list of one
    keyed_by: str | None = None  # a list written as a mapping: key -> this field
    nonempty: bool = False
    # A keyed list whose items' class depends on their ``type`` key: the
    # type's name -> the dataclass to build (raises ValueError if unknown).
    kind_of: Callable[[str], type] | None = None


RULE_KEY = "spamtrap.rule"
NO_RULE = Rule()


def rule(
    parse: Parser | None = None,
    *,
    one_or_many: bool = False,
    keyed_by: str | None = None,
    nonempty: bool = False,
    kind_of: Callable[[str], type] | None = None,
) -> Mapping[str, Any]:
    """Field metadata declaring the field's rule, next to its type and default."""
    return {RULE_KEY: Rule(parse, one_or_many, keyed_by, nonempty, kind_of)}


def rule_of(metadata: Mapping[str, Any]) -> Rule:
    """The rule a field declares in its metadata (none: the type's default)."""
    found = metadata.get(RULE_KEY, NO_RULE)
    assert isinstance(found, Rule)
    return found
