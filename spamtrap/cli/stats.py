"""``spamtrap stats``: what the bundle indexes say, per hour or per day.

It reads indexes (:mod:`spamtrap.bundle.index`), never bundles, from

- a directory laid out ``DIR/<set>/<name>.index.jsonl``: a local store
  (``DATA/bundles``) or a ``spamtrap pull`` destination; or one set's
  directory itself;
- an ``http(s)://`` URL of a node's set listing, ``URL/bundles/<set>/``
  (or the node's base URL with ``--set``), with the set's bearer token as
  ``spamtrap pull --http`` takes it. Each index is fetched beside its bundle
  and checked against the manifest's ``index_sha256``, as pull does.

and prints, per period, the messages and the top campaigns, SMTP dialects,
HELO names and peers with their counts (``--json``: one JSON document).
``--since`` takes a UTC time (``2026-11-22``, ``2026-11-22T13:30``) or an
age (``90m``, ``24h``, ``7d``).

Errors name the file (or URL) and line: a missing directory or a bad
argument exits 2; a corrupt index line, an index that fails its sha256 or
a listing that fails is reported, the rest is still counted, and the exit
status is 1. Long runs show progress on stderr.
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import io
import json
import os
import re
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from spamtrap.bundle.index import IndexEntry, IndexFormatError, read_index
from spamtrap.cli.pull_remote import Problem, PullError, Remote, parse_json
from spamtrap.cli.pull_sources import UrlSource, remote_from
from spamtrap.intake.parse import dialect_family
from spamtrap.store import BUNDLE_SUFFIX, INDEX_SUFFIX, KEY_RE, MANIFEST_SUFFIX, valid_set_name

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# What is counted per period: the title, and the index field.
DIMENSIONS = (
    ("campaigns", "campaign"),
    ("dialects", "dialect"),
    ("helos", "helo"),
    ("peers", "peer"),
)
PERIODS = {"hour": 13, "day": 10}  # characters of an ISO time that name the period
UNKNOWN = "(none)"
DEFAULT_TOP = 10
DEFAULT_TIMEOUT = 60.0
_AGE = re.compile(r"([0-9]+)([smhdw])")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}(:[0-9]{2}(:[0-9]{2})?)?)?Z?")


class StatsError(Exception):
    """A source that cannot be read at all (exit 1), or, with ``usage``,
    an argument that is wrong (exit 2)."""

    def __init__(self, text: str, usage: bool = False) -> None:
        super().__init__(text)
        self.usage = usage


def parse_since(text: str, now: float) -> str:
    """``--since`` as the ISO prefix it is compared with (index times are
    ``2026-11-22T13:31:15.123Z``, so string order is time order)."""
    text = text.strip()
    age = _AGE.fullmatch(text)
    if age is not None:
        seconds = int(age.group(1)) * _AGE_SECONDS[age.group(2)]
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - seconds))
    if _TIME.fullmatch(text) is None:
        raise StatsError(
            f"--since {text!r}: expected a UTC time (2026-11-22, 2026-11-22T13:30) "
            "or an age (90m, 24h, 7d)",
            usage=True,
        )
    try:
        calendar.timegm(time.strptime(text.rstrip("Z")[:10], "%Y-%m-%d"))
    except ValueError:
        raise StatsError(f"--since {text!r}: no such date", usage=True) from None
    return text.rstrip("Z")


@dataclass
class Period:
    """The counts of one hour or day."""

    messages: int = 0
    counts: dict[str, Counter[str | None]] = field(
        default_factory=lambda: {name: Counter() for name, _ in DIMENSIONS}
    )


class Tally:
    """Index entries counted by period (``by``: hour or day), from ``since``."""

    def __init__(self, by: str, since: str | None) -> None:
        self.width = PERIODS[by]
        self.since = since
        self.periods: dict[str, Period] = {}
        self.messages = 0
        self.indexes = 0

    def add(self, entry: IndexEntry) -> None:
        received = entry.get("received")
        if self.since is not None and (received is None or received < self.since):
            return
        key = received[: self.width] if isinstance(received, str) else UNKNOWN
        period = self.periods.get(key)
        if period is None:
            period = self.periods[key] = Period()
        period.messages += 1
        self.messages += 1
        for name, index_field in DIMENSIONS:
            value = entry.get(index_field)
            if index_field == "dialect" and isinstance(value, str):
                value = dialect_family(value)  # one bot, one family
            period.counts[name][value] += 1

    def report(self, top: int) -> list[dict[str, Any]]:
        """The periods in time order, each with its ``top`` values per dimension."""
        out = []
        for key in sorted(self.periods):
            period = self.periods[key]
            doc: dict[str, Any] = {"period": key, "messages": period.messages}
            for name, _ in DIMENSIONS:
                doc[name] = [
                    {"value": value, "count": n} for value, n in _top(period.counts[name], top)
                ]
            out.append(doc)
        return out


def _top(counts: Counter[str | None], n: int) -> list[tuple[str | None, int]]:
    # Most first, then by value, so equal counts print in a stable order.
    return sorted(counts.items(), key=lambda vc: (-vc[1], str(vc[0])))[:n]


class Progress:
    """``indexes done/total, messages`` on stderr once a run takes a while:
    redrawn in place on a terminal, a line now and then otherwise."""

    def __init__(
        self, stream: TextIO, clock: Callable[[], float] = time.monotonic, after: float = 2.0
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.tty = stream.isatty()
        self.every = 0.2 if self.tty else 10.0
        self.started = clock()
        self.after = after
        self.last = float("-inf")
        self.shown = False

    def step(self, done: int, total: int, messages: int) -> None:
        now = self.clock()
        if now - self.started < self.after or now - self.last < self.every:
            return
        self.last = now
        text = f"spamtrap stats: {done}/{total} indexes, {messages} messages"
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def error(self, text: str) -> None:
        self.clear()
        print(f"spamtrap stats: {text}", file=self.stream)

    def clear(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.shown = False


@dataclass
class Source:
    """Where the indexes are: what to read, and how to read one."""

    what: str
    indexes: list[Any]  # opaque to the caller: handed back to read
    read: Callable[[Any], Iterator[IndexEntry]]
    problems: list[str] = field(default_factory=list)


def _old(manifest_last: object, since: str | None) -> bool:
    """Whether a bundle's manifest says it ends before ``since``."""
    return since is not None and isinstance(manifest_last, str) and manifest_last < since


# -- local directories ------------------------------------------------------


def local_source(path: str, sets: list[str], since: str | None) -> Source:
    """The indexes under ``path`` (a store, a pull destination or one set's
    directory), oldest first; those of ``sets`` only, if given."""
    if not os.path.isdir(path):
        raise StatsError(f"{path}: no such directory", usage=True)
    here = os.path.basename(os.path.normpath(path))
    found = _indexes_in(path, here)
    if found:  # a set's own directory
        if sets and here not in sets:
            found = []
    else:
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise StatsError(f"{path}: {e.strerror or e}") from e
        for name in names:
            sub = os.path.join(path, name)
            if valid_set_name(name) and os.path.isdir(sub) and (not sets or name in sets):
                found += _indexes_in(sub, name)
    found = [p for p in found if not _old(_manifest_last(p), since)]
    return Source(path, found, _read_file)


def _indexes_in(directory: str, set_name: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        os.path.join(directory, n)
        for n in names
        if n.endswith(INDEX_SUFFIX) and KEY_RE.fullmatch(f"{set_name}/{n}")
    ]


def _manifest_last(index_path: str) -> object:
    """The manifest's ``last_received`` beside an index, if it reads."""
    try:
        with open(index_path[: -len(INDEX_SUFFIX)] + MANIFEST_SUFFIX, "rb") as f:
            return json.loads(f.read()).get("last_received")
    except (OSError, ValueError, AttributeError):
        return None


def _read_file(path: str) -> Iterator[IndexEntry]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise StatsError(f"{path}: {e.strerror or e}") from e
    with f:
        yield from read_index(f, path)


# -- a node's listing over HTTP ------------------------------------------------


def http_source(
    url: str, sets: list[str], tokens: list[str], since: str | None, timeout: float
) -> Source:
    """The indexes a node lists: ``URL`` is a set's ``/bundles/<set>/``
    listing, or the node's base URL with ``sets``."""
    parts = urllib.parse.urlsplit(url)
    match = re.fullmatch(r"(.*)/bundles/([^/]+)/?", parts.path)
    if match is not None:
        base = urllib.parse.urlunsplit(parts._replace(path=match.group(1), query=""))
        named = urllib.parse.unquote(match.group(2))
        if sets and named not in sets:
            raise StatsError(f"{url} lists set {named}, not {', '.join(sets)}", usage=True)
        sets = [named]
    elif not sets:
        raise StatsError(f"{url}: give --set, or a listing URL (URL/bundles/SET/)", usage=True)
    else:
        base = url
    base = base.rstrip("/")
    fetcher = UrlSource(timeout)
    source = Source(url, [], lambda remote: _read_remote(fetcher, remote))
    for set_name in sets:
        token = _token(tokens, set_name, sets)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        listing = f"{base}/bundles/{urllib.parse.quote(set_name)}/"
        try:
            page = parse_json(fetcher.get(listing, headers), f"listing {listing}")
        except PullError as e:
            hint = "" if token else " (no token: give --token or set SPAMTRAP_TOKEN)"
            source.problems.append(f"set {set_name}: {e}{hint}")
            continue
        entries = page.get("bundles")
        if not isinstance(entries, list):
            source.problems.append(f"set {set_name}: {listing}: a listing without bundles")
            continue
        remotes = []
        for entry in entries:
            found = (
                remote_from(entry, set_name, f"{listing}: entry")
                if isinstance(entry, dict)
                else Problem(f"{listing}: entry {entry!r:.60}: not a JSON object")
            )
            if isinstance(found, Problem):
                source.problems.append(found.text)
            elif found.index_sha256 is not None and not _old(entry.get("last_received"), since):
                remotes.append(found)  # a bundle without an index has nothing to count
        source.indexes += sorted(remotes, key=lambda r: r.key)  # the listing is newest first
    return source


def _token(values: list[str], set_name: str, sets: list[str]) -> str | None:
    """``--token TOKEN`` or ``--token SET=TOKEN`` for one of ``sets`` (else
    $SPAMTRAP_TOKEN), as pull takes them."""
    token = os.environ.get("SPAMTRAP_TOKEN")
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name in sets:
            if name == set_name:
                return rest
        else:
            token = value
    return token


def _read_remote(fetcher: UrlSource, remote: Remote) -> Iterator[IndexEntry]:
    try:
        data = fetcher.fetch_index(remote)
    except PullError as e:
        raise StatsError(str(e)) from e
    where = remote.index_location or remote.location[: -len(BUNDLE_SUFFIX)] + INDEX_SUFFIX
    if hashlib.sha256(data).hexdigest() != remote.index_sha256:
        raise StatsError(f"{where}: the index's sha256 does not match its manifest")
    yield from read_index(io.BytesIO(data), where)


# -- the command ------------------------------------------------------------------


def collect(source: Source, tally: Tally, progress: Progress) -> int:
    """Count every index of ``source``; the number of errors (each shown)."""
    errors = 0
    for problem in source.problems:
        progress.error(problem)
        errors += 1
    total = len(source.indexes)
    for done, item in enumerate(source.indexes, 1):
        try:
            for entry in source.read(item):
                tally.add(entry)
        except (IndexFormatError, StatsError) as e:
            progress.error(f"{e}; the rest of this index is not counted")
            errors += 1
        tally.indexes += 1
        progress.step(done, total, tally.messages)
    progress.clear()
    return errors


def render_text(tally: Tally, top: int, out: TextIO) -> None:
    for period in tally.report(top):
        print(f"{_period_name(period['period'])}  {period['messages']} messages", file=out)
        for name, _ in DIMENSIONS:
            for i, row in enumerate(period[name]):
                label = name if i == 0 else ""
                value = UNKNOWN if row["value"] is None else row["value"]
                print(f"  {label:<10} {row['count']:>8}  {value}", file=out)
        print(file=out)
    print(f"{tally.messages} messages in {tally.indexes} indexes", file=out)


def _period_name(key: str) -> str:
    return key.replace("T", " ") + ":00Z" if len(key) == PERIODS["hour"] else key


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``spamtrap stats`` with parsed arguments; the exit status."""
    out = out if out is not None else _text_out(sys.stdout)
    err = err if err is not None else _text_out(sys.stderr)
    progress = Progress(err)
    try:
        bad = [s for s in args.set if not valid_set_name(s)]
        if bad:
            raise StatsError(f"invalid set name {bad[0]!r}", usage=True)
        if args.top < 1 or args.timeout <= 0:
            raise StatsError("--top takes 1 or more, --timeout more than 0 seconds", usage=True)
        since = parse_since(args.since, time.time()) if args.since else None
        if urllib.parse.urlsplit(args.source).scheme in ("http", "https"):
            source = http_source(args.source, args.set, args.token, since, args.timeout)
        else:
            source = local_source(args.source, args.set, since)
        tally = Tally(args.by, since)
        errors = collect(source, tally, progress)
    except StatsError as e:
        progress.error(str(e))
        return EXIT_USAGE if e.usage else EXIT_FAILED
    except KeyboardInterrupt:
        progress.error("interrupted")
        return EXIT_FAILED
    if not tally.indexes and not errors:
        progress.error(
            f"{args.source}: no bundle indexes found (bundles stored before indexes have none)"
        )
    if args.json:
        doc = {
            "source": args.source,
            "by": args.by,
            "since": since,
            "indexes": tally.indexes,
            "messages": tally.messages,
            "errors": errors,
            "periods": tally.report(args.top),
        }
        json.dump(doc, out, ensure_ascii=True)
        out.write("\n")
    else:
        render_text(tally, args.top, out)
    return EXIT_FAILED if errors else EXIT_OK


def _text_out(stream: TextIO) -> TextIO:
    """``stream`` writing what a sender put in a HELO (undecodable bytes
    kept as surrogates, terminal escapes) without failing or obeying it."""
    try:
        stream.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
    except (AttributeError, io.UnsupportedOperation):
        pass
    return stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="DIR-or-URL",
        help="a store or pull directory (DIR/<set>/), a set's directory, or a node's "
        "listing URL (http://node:8025/bundles/SET/)",
    )
    p.add_argument(
        "--set", metavar="NAME", action="append", default=[], help="only this set (repeatable)"
    )
    p.add_argument(
        "--since", metavar="T", help="from this UTC time (2026-11-22T13) or age (24h, 7d) on"
    )
    p.add_argument("--by", choices=tuple(PERIODS), default="hour", help="period (default: hour)")
    p.add_argument(
        "--top", metavar="N", type=int, default=DEFAULT_TOP, help="values shown per list (10)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--token",
        metavar="[SET=]TOKEN",
        action="append",
        default=[],
        help="bearer token for a URL, for every set or one (default: $SPAMTRAP_TOKEN)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="per HTTP request (default: 60)",
    )
