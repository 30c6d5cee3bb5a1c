"""``spamtrap pull``: follow sets, download their new bundles, verify, unpack.

A plain blocking program (no reactor): it lists each set at its source,
downloads every bundle it does not have yet into ``DEST/<set>/``, checks
size and sha256 against the bundle's manifest, and records it in a state
file. See docs/pull.md.

Sources (exactly one):

- ``--http URL``: a spamtrap node's feed, ``URL/feeds/<set>``, with the
  set's bearer token; pages are followed with the returned cursor.
- ``--mail PATH``: a maildir or mbox holding the set's list notices; each
  notice's body is ``Header: value`` lines (Set, Key, URL, SHA256, Size...).
  A notice of a followed set that cannot be followed (no URL, a URL that is
  not http(s), a malformed key, size or sha256) is an error naming the
  notice by its Message-ID, not a silent skip.
- ``--s3 s3://bucket/prefix``: the bucket itself, listed with credentials
  (botocore's standard chain), manifests first: a manifest is the commit
  marker of its bundle.

Bundle keys start with the time the bundle was opened, and a bundle is
stored up to a rotation period (or an outage) later, so a bundle can appear
behind a newer one. Listings therefore start ``--overlap`` seconds before
the newest key seen, and the state file's record of each key makes the
overlap cost nothing but the listing.

Unpacking (``--unpack``) is recorded per bundle and target in the state
file, so bundles an earlier run fetched without it are unpacked by the
first run that asks, once. ``--unpack maildir --wire`` writes each
message's wire bytes (as the SMTP client sent them) instead of the stored
form; see :func:`wire_bytes`.

Downloads go to ``DEST/<key>.part`` and resume with a Range request from
its size; a verified file is renamed into place. Exit status: 0 when all
went well, 1 when something failed (the rest is still done), 2 on usage
errors.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import email
import email.policy
import fcntl
import gzip
import hashlib
import http.client
import json
import mailbox
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, TextIO

from spamtrap import __version__
from spamtrap.bundle.mbox import MboxReader
from spamtrap.message import wire_bytes
from spamtrap.store import BUNDLE_SUFFIX, KEY_RE, MANIFEST_SUFFIX, valid_set_name
from spamtrap.store.published import subject_set

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

CHUNK = 64 * 1024
PAGE = 500  # feed entries asked for per request
DEFAULT_OVERLAP = 86400.0
DEFAULT_TIMEOUT = 60.0
STATE_NAME = ".spamtrap-pull.json"
STATE_VERSION = 1
UNPACK_TARGETS = ("maildir", "mbox", "wire")
WIRE_DIR = "wire"  # DEST/<set>/wire/: a maildir of the messages' wire bytes
MAX_SKIPPED_REPORTED = 10  # per bundle; the rest are counted in one line
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIME = "%Y-%m-%dT%H:%M:%S"
USER_AGENT = f"spamtrap-pull/{__version__}"


class PullError(Exception):
    """A bundle or a listing failed; the message says which and why."""


class ResumeRefusedError(PullError):
    """The source cannot resume from the requested offset."""


@dataclass
class Remote:
    """A bundle at a source."""

    key: str  # "<set>/<name>.mbox.gz"
    location: str  # where the source fetches it: a URL or an S3 object key
    size: int | None = None
    sha256: str | None = None
    manifest_location: str | None = None  # a notice's Manifest-URL, if any

    @property
    def set_name(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def cursor(self) -> str:
        return self.key.split("/", 1)[1][: -len(BUNDLE_SUFFIX)]


@dataclass(frozen=True)
class RemoteManifest:
    """What pull takes from a manifest another node or store sent: the
    bundle's key, size and sha256. Checked here, not by
    ``spamtrap.bundle.manifest.Manifest``: the remote may be an older spamtrap or
    another tool, so fields pull does not use are not required, and an
    upper-case sha256 is accepted."""

    key: str
    size: int
    sha256: str  # lower case


def remote_manifest(data: bytes, remote: Remote) -> RemoteManifest:
    """Parse a remote's manifest of ``remote``; PullError naming the remote
    key and the bad field otherwise."""
    doc = _json(data, f"manifest of {remote.key}")
    raw_key = doc.get("key")
    if bundle_key(str(raw_key or "")) != remote.key:
        raise PullError(f"{remote.key}: the manifest is for {raw_key!r}")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PullError(f"{remote.key}: manifest field size: {size!r} is not a number of bytes")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
        raise PullError(f"{remote.key}: manifest field sha256: {sha!r} is not 64 hex digits")
    return RemoteManifest(remote.key, size, sha.lower())


@dataclass
class Problem:
    """An entry of a listing (a notice, a feed entry) that cannot be
    followed; ``key`` is the bundle it names, when that key is valid."""

    text: str
    key: str | None = None


class Source(Protocol):
    def listing(self, set_name: str, since: str | None) -> tuple[list[Remote], list[Problem]]:
        """The set's bundles after ``since`` (a cursor), oldest first (a
        source without cursors may return older ones too), and the entries
        that name a bundle of the set but cannot be followed."""
        ...

    def manifest(self, remote: Remote) -> RemoteManifest:
        """The bundle's manifest (see :func:`remote_manifest`)."""
        ...

    def fetch(self, remote: Remote, offset: int) -> tuple[Generator[bytes, None, None], int]:
        """The bundle's bytes from ``offset`` on, as chunks, and the offset
        they really start at (0 when the source ignored the range)."""
        ...


def bundle_key(text: str) -> str | None:
    """``<set>/<name>.mbox.gz`` from a key that may carry a store prefix;
    None if it is not a bundle key (a notice's key is untrusted input that
    becomes a file name: only exact keys pass)."""
    tail = "/".join(text.strip().split("/")[-2:])
    if KEY_RE.fullmatch(tail) is None or not tail.endswith(BUNDLE_SUFFIX):
        return None
    return tail


def _manifest_name(name: str) -> str:
    return name[: -len(BUNDLE_SUFFIX)] + MANIFEST_SUFFIX


# -- HTTP: feeds, notices' URLs ------------------------------------------------


def _http_url(url: str) -> str:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise PullError(f"not an http(s) URL: {url!r}")
    return url


def _http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked
        _http_url(url), headers={"User-Agent": USER_AGENT, **(headers or {})}
    )
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310


def _chunks(body: IO[bytes], what: str) -> Generator[bytes, None, None]:
    with body:
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        except (OSError, http.client.HTTPException) as e:
            raise PullError(f"{what}: download interrupted ({e}); the next run resumes it")


class _UrlSource:
    """Bundles fetched by URL, manifests beside them (``.json``)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def manifest(self, remote: Remote) -> RemoteManifest:
        url = remote.manifest_location or remote.location
        if remote.manifest_location is None:
            if not url.endswith(BUNDLE_SUFFIX):
                raise PullError(f"{remote.key}: no manifest URL for {url}")
            url = _manifest_name(url)
        return remote_manifest(self._get(url), remote)

    def fetch(self, remote: Remote, offset: int) -> tuple[Generator[bytes, None, None], int]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = _http_get(remote.location, self.timeout, headers)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                raise ResumeRefusedError(f"{remote.key}: cannot resume at byte {offset}")
            raise PullError(f"{remote.key}: {remote.location}: HTTP {e.code} {e.reason}")
        except OSError as e:
            raise PullError(f"{remote.key}: {remote.location}: {e}")
        start = 0
        if response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if match is None:
                response.close()
                raise PullError(f"{remote.key}: partial answer without a Content-Range")
            start = int(match.group(1))
        return _chunks(response, remote.key), start

    def _get(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        try:
            with _http_get(url, self.timeout, headers) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as e:
            e.close()
            raise PullError(f"{url}: HTTP {e.code} {e.reason}")
        except OSError as e:
            raise PullError(f"{url}: {e}")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise PullError(f"{what}: not JSON ({e})")
    if not isinstance(doc, dict):
        raise PullError(f"{what}: not a JSON object")
    return doc


def _remote_from(entry: dict[str, Any], set_name: str, what: str) -> Remote | Problem:
    """A Remote from a feed entry or a notice (``url``, ``key``, ``size``,
    ``sha256`` and optionally ``manifest_url``), or why it is unusable;
    ``what`` names the entry in the problem's text."""
    raw_key = entry.get("key")
    key = bundle_key(str(raw_key)) if raw_key is not None else None
    if key is None:
        return Problem(f"{what}: {raw_key!r} is not a bundle key (<set>/<name>.mbox.gz)")
    what = f"{what} ({key})"
    if key.split("/", 1)[0] != set_name:
        return Problem(f"{what}: the key is not of set {set_name}", key)
    url = entry.get("url")
    if not url:
        return Problem(
            f"{what}: no URL to download it from (a node whose store gave no public "
            f"URL sent it); follow set {set_name} with --http or --s3 instead",
            key,
        )
    manifest_url = entry.get("manifest_url") or None
    for name, value in (("URL", url), ("manifest URL", manifest_url)):
        if value is not None and not _is_http_url(str(value)):
            return Problem(f"{what}: the {name} {str(value)!r} is not an http(s) URL", key)
    size, sha = entry.get("size"), entry.get("sha256")
    if size is not None:
        text = str(size)
        if isinstance(size, bool) or not text.isdigit() or not text.isascii():
            return Problem(f"{what}: the size {text!r} is not a number of bytes", key)
        size = int(text)
    if sha is not None:
        sha = str(sha).lower()
        if _SHA256.fullmatch(sha) is None:
            return Problem(
                f"{what}: the sha256 {str(entry.get('sha256'))!r} is not 64 hex digits", key
            )
    return Remote(key, str(url), size, sha, str(manifest_url) if manifest_url else None)


def _is_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and url.isprintable()


def _collect(results: list[Remote | Problem]) -> tuple[list[Remote], list[Problem]]:
    """Remotes by key (the first usable entry of a key wins) and the
    problems of keys that no usable entry names."""
    found: dict[str, Remote] = {}
    problems: list[Problem] = []
    for result in results:
        if isinstance(result, Remote):
            found.setdefault(result.key, result)
        else:
            problems.append(result)
    problems = [p for p in problems if p.key is None or p.key not in found]
    return sorted(found.values(), key=lambda r: r.key), problems


class FeedSource(_UrlSource):
    """A spamtrap node's ``/feeds/<set>``; ``tokens`` maps set -> token."""

    def __init__(self, base_url: str, tokens: dict[str, str], timeout: float) -> None:
        super().__init__(timeout)
        self.base = _http_url(base_url).rstrip("/")
        self.tokens = tokens

    def listing(self, set_name: str, since: str | None) -> tuple[list[Remote], list[Problem]]:
        headers = {"Authorization": f"Bearer {self.tokens[set_name]}"}
        results: list[Remote | Problem] = []
        cursor = since or ""
        while True:
            query = urllib.parse.urlencode({"since": cursor, "limit": PAGE})
            url = f"{self.base}/feeds/{urllib.parse.quote(set_name)}?{query}"
            try:
                page = _json(self._get(url, headers), f"feed of set {set_name}")
            except PullError as e:
                raise PullError(f"set {set_name}: {e}")
            entries = page.get("bundles")
            if not isinstance(entries, list):
                raise PullError(f"set {set_name}: feed answer without bundles")
            for entry in entries:
                what = f"set {set_name}: feed entry"
                if isinstance(entry, dict):
                    results.append(_remote_from(entry, set_name, what))
                else:
                    results.append(Problem(f"{what} {entry!r}: not a JSON object"))
            next_cursor = page.get("cursor")
            if not page.get("more") or not isinstance(next_cursor, str) or next_cursor <= cursor:
                break
            cursor = next_cursor
        return _collect(results)


@dataclass
class Notice:
    """One mail of a notice folder: its body's fields (lower-case names)."""

    message_id: str | None
    fields: dict[str, str]
    subject_set: str | None = None  # the set our Subject names, if it is ours

    def describe(self, where: str) -> str:
        return f"notice {self.message_id}" if self.message_id else f"notice {where}"


class MailSource(_UrlSource):
    """List notices in a maildir or an mbox file."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(timeout)
        self.path = path
        self._notices: list[tuple[Notice, str]] | None = None

    def listing(self, set_name: str, since: str | None) -> tuple[list[Remote], list[Problem]]:
        # Every notice, whatever ``since``: mail arrives in no useful order,
        # and the state file skips what is done.
        results: list[Remote | Problem] = []
        for notice, where in self.notices():
            what = notice.describe(where)
            fields = notice.fields
            if "key" not in fields:
                # Our Subject, but no body to follow: mangled on the way.
                if notice.subject_set == set_name:
                    text = f"{what}: a notice of set {set_name} without a Key field in its body"
                    results.append(Problem(text))
                continue
            named = fields.get("set") or fields["key"].strip().split("/", 1)[0]
            if named != set_name:
                continue  # another set's notice, or another list's mail
            entry = {**fields, "manifest_url": fields.get("manifest-url")}
            results.append(_remote_from(entry, set_name, what))
        return _collect(results)

    def notices(self) -> list[tuple[Notice, str]]:
        """The folder's notices and where each is (file name or position)."""
        if self._notices is None:
            found = []
            for where, raw in self._messages():
                notice = read_notice(raw)
                if notice is not None:
                    found.append((notice, where))
            self._notices = found
        return self._notices

    def _messages(self) -> Iterator[tuple[str, bytes]]:
        box: mailbox.Mailbox
        if os.path.isdir(self.path):
            if not all(os.path.isdir(os.path.join(self.path, d)) for d in ("new", "cur")):
                raise PullError(f"{self.path}: a directory but not a maildir (no new/ and cur/)")
            box = mailbox.Maildir(self.path, factory=None, create=False)
        elif os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                head = f.read(5)
            if head and head != b"From ":
                raise PullError(f"{self.path}: not an mbox file (it does not start with 'From ')")
            box = mailbox.mbox(self.path, factory=None, create=False)
        else:
            raise PullError(f"{self.path}: no such maildir or mbox")
        try:
            for n, key in enumerate(box.keys()):
                where = f"{key if isinstance(box, mailbox.Maildir) else f'#{n + 1}'} in {self.path}"
                try:
                    yield where, box.get_bytes(key)
                except (OSError, KeyError):
                    continue  # read or moved away by a mail client meanwhile
        except OSError as e:
            raise PullError(f"{self.path}: reading the mailbox: {e}")
        finally:
            box.close()


def read_notice(raw: bytes) -> Notice | None:
    """The mail as a notice: its Message-ID and the ``Header: value`` lines
    of its first text/plain body; None for mail that is neither a notice nor
    carries our Subject."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:  # noqa: BLE001 - a mailbox holds other mail too; none may stop the run
        return None
    message_id = _header(message, "message-id")
    # Our notices' Subject, as the daemon writes it; a list may prefix it.
    notice = Notice(message_id, {}, subject_set(_header(message, "subject") or ""))
    try:
        part = message.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else None
    except Exception:  # noqa: BLE001 - undecodable: judged by its Subject below
        text = None
    if isinstance(text, str):
        fields = email.message_from_string(text.lstrip("\r\n"), policy=email.policy.compat32)
        notice.fields = {name.lower(): str(value).strip() for name, value in fields.items()}
    if "key" in notice.fields or notice.subject_set is not None:
        return notice
    return None


def _header(message: email.message.Message, name: str) -> str | None:
    try:
        value = message.get(name)
        return " ".join(str(value).split()) if value is not None else None
    except Exception:  # noqa: BLE001 - a malformed header is no header
        return None


def parse_notice(raw: bytes) -> dict[str, str]:
    """A list notice's fields (lower-case names), from the ``Header: value``
    lines of its first text/plain body; {} for any other mail."""
    notice = read_notice(raw)
    return notice.fields if notice is not None and "key" in notice.fields else {}


class S3Source:
    """``s3://bucket/prefix``: objects ``prefix/<set>/<name>.mbox.gz`` and
    their manifests, through botocore (its standard credential chain)."""

    def __init__(self, url: str, endpoint: str | None, region: str | None, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        import botocore.config
        import botocore.session

        endpoint = (
            endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        # S3-compatible servers (SeaweedFS, Garage, MinIO) want path-style.
        style = "path" if endpoint else "auto"
        config = botocore.config.Config(
            s3={"addressing_style": style},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        session = botocore.session.get_session()
        self.client = session.create_client(
            "s3", endpoint_url=endpoint, region_name=region, config=config
        )

    def listing(self, set_name: str, since: str | None) -> tuple[list[Remote], list[Problem]]:
        from botocore.exceptions import BotoCoreError, ClientError

        folder = f"{self.prefix}{set_name}/"
        kwargs = {"Bucket": self.bucket, "Prefix": folder}
        if since:
            kwargs["StartAfter"] = folder + since
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for item in page.get("Contents", []):
                    name = item["Key"][len(folder) :]
                    if not name.endswith(MANIFEST_SUFFIX):
                        continue  # a bundle without its manifest is not complete
                    key = bundle_key(f"{set_name}/{name[: -len(MANIFEST_SUFFIX)]}{BUNDLE_SUFFIX}")
                    if key is not None:
                        found.append(Remote(key, folder + key.split("/", 1)[1]))
        except (BotoCoreError, ClientError) as e:
            raise PullError(f"set {set_name}: listing s3://{self.bucket}/{folder}: {e}")
        return sorted(found, key=lambda r: r.key), []

    def manifest(self, remote: Remote) -> RemoteManifest:
        from botocore.exceptions import BotoCoreError, ClientError

        key = _manifest_name(remote.location)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                data = body.read()
        except (BotoCoreError, ClientError) as e:
            raise PullError(f"{remote.key}: manifest s3://{self.bucket}/{key}: {e}")
        return remote_manifest(data, remote)

    def fetch(self, remote: Remote, offset: int) -> tuple[Generator[bytes, None, None], int]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"Bucket": self.bucket, "Key": remote.location}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            response = self.client.get_object(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                raise ResumeRefusedError(f"{remote.key}: cannot resume at byte {offset}")
            raise PullError(f"{remote.key}: s3://{self.bucket}/{remote.location}: {e}")
        except BotoCoreError as e:
            raise PullError(f"{remote.key}: s3://{self.bucket}/{remote.location}: {e}")
        start = 0
        match = re.match(r"bytes (\d+)-", response.get("ContentRange") or "")
        if match is not None:
            start = int(match.group(1))
        return _s3_chunks(response["Body"], remote.key), start


def _s3_chunks(body: Any, what: str) -> Generator[bytes, None, None]:
    from botocore.exceptions import BotoCoreError

    with contextlib.closing(body):
        try:
            yield from body.iter_chunks(CHUNK)
        except (OSError, BotoCoreError) as e:
            raise PullError(f"{what}: download interrupted ({e}); the next run resumes it")


# -- the state file ----------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class State:
    """What this destination has: per set the newest cursor seen, per key
    the verified bundle and whether it is unpacked. Written atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cursors: dict[str, str] = {}
        self.bundles: dict[str, dict[str, Any]] = {}
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise PullError(f"state file {path}: {e}")
        cursors = doc.get("cursors", {}) if isinstance(doc, dict) else None
        bundles = doc.get("bundles", {}) if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("version") != STATE_VERSION
            or not isinstance(cursors, dict)
            or not isinstance(bundles, dict)
            or not all(isinstance(b, dict) for b in bundles.values())
        ):
            raise PullError(f"state file {path}: not a spamtrap pull state (version 1)")
        for key, entry in bundles.items():
            if "unpacked" in entry or "unpack" in entry:
                entry["unpacked"] = _unpacked(entry, f"state file {path}: {key}")
        self.cursors, self.bundles = cursors, bundles

    def save(self) -> None:
        doc = {"version": STATE_VERSION, "cursors": self.cursors, "bundles": self.bundles}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(directory)


def _unpacked(entry: dict[str, Any], what: str) -> dict[str, bool]:
    """A bundle's unpack record: target ("mbox", "maildir", "wire") -> done.
    Older state files kept one target: ``"unpack": T, "unpacked": bool``."""
    unpacked = entry.get("unpacked", {})
    if isinstance(unpacked, bool):
        mode = entry.pop("unpack", None)
        unpacked = {mode: unpacked} if isinstance(mode, str) else {}
    if not isinstance(unpacked, dict) or not all(
        m in UNPACK_TARGETS and isinstance(v, bool) for m, v in unpacked.items()
    ):
        raise PullError(
            f"{what}: 'unpacked' is not a map of {', '.join(UNPACK_TARGETS)} to true/false"
        )
    return unpacked


@contextlib.contextmanager
def _locked(state_path: str) -> Iterator[None]:
    """One pull per state file: cron runs must not overlap."""
    with open(state_path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PullError(f"another spamtrap pull is using {state_path}")
        yield


def rewind(cursor: str | None, overlap: float) -> str | None:
    """A cursor ``overlap`` seconds before ``cursor`` (a bare time, which
    sorts before every key of that second); None to list from the start."""
    if not cursor:
        return None
    try:
        t = calendar.timegm(time.strptime(cursor[:19], _TIME))
    except ValueError:
        return None
    return time.strftime(_TIME, time.gmtime(max(0, t - overlap)))


# -- progress ------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; nothing otherwise."""

    WIDTH = 24

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.bundles = self.total_bundles = 0
        self.bytes = self.total_bytes = 0
        self._last = 0.0
        self._shown = False

    def start(self, bundles: int, total_bytes: int) -> None:
        self.total_bundles, self.total_bytes = bundles, total_bytes
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.bytes += n
        self._draw()

    def done(self, n: int = 1) -> None:
        self.bundles += n
        self._draw(force=True)

    def skip_bytes(self, n: int) -> None:
        """Bytes that will not come (a bundle failed or was resumed)."""
        self.total_bytes = max(self.bytes, self.total_bytes - n)

    def error(self, text: str) -> None:
        """An error line, above the bar."""
        self._clear()
        print(f"spamtrap pull: {text}", file=self.stream)
        self._draw(force=True)

    def finish(self, summary: str) -> None:
        if self.enabled:
            self._clear()
            print(summary, file=self.stream)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or not self.total_bundles:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        fraction = self.bytes / self.total_bytes if self.total_bytes else 1.0
        filled = int(self.WIDTH * min(fraction, 1.0))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(
            f"\r[{bar}] {self.bundles}/{self.total_bundles} bundles "
            f"{_mb(self.bytes)}/{_mb(self.total_bytes)} MB"
        )
        self.stream.flush()
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


# -- downloading ----------------------------------------------------------------


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: str, remote: Remote) -> bool:
    return os.path.getsize(path) == remote.size and _sha256_of(path) == remote.sha256


class Puller:
    def __init__(
        self,
        source: Source,
        dest: str,
        state: State,
        unpack: str | None,
        progress: Progress,
        overlap: float,
    ) -> None:
        self.source = source
        self.dest = dest
        self.state = state
        self.unpack = unpack
        self.progress = progress
        self.overlap = overlap
        self.failures = 0
        self.fetched = 0
        self.fetched_bytes = 0

    def fail(self, text: str) -> None:
        self.failures += 1
        self.progress.error(text)

    def run(self, sets: list[str]) -> None:
        self._catch_up_unpacking(sets)
        todo: list[Remote] = []
        listed: dict[str, list[Remote]] = {}
        for set_name in sets:
            try:
                since = rewind(self.state.cursors.get(set_name), self.overlap)
                remotes, problems = self.source.listing(set_name, since)
            except PullError as e:
                self.fail(str(e))
                continue
            for problem in problems:
                # A bundle fetched already (through a good notice, or by an
                # earlier run) needs nothing from a bad entry naming it.
                if problem.key is None or problem.key not in self.state.bundles:
                    self.fail(problem.text)
            listed[set_name] = remotes
            for remote in remotes:
                if remote.key in self.state.bundles:
                    continue
                if (remote.size is None or remote.sha256 is None) and not self._describe(remote):
                    continue
                todo.append(remote)
        failed: set[str] = set()
        self.progress.start(len(todo), sum(r.size or 0 for r in todo))
        for remote in todo:
            try:
                self._pull(remote)
            except PullError as e:
                failed.add(remote.key)
                self.fail(str(e))
            self.progress.done()
        for set_name, remotes in listed.items():
            self._advance_cursor(set_name, remotes, failed)
        self.state.save()

    def _describe(self, remote: Remote) -> bool:
        """Complete a remote's size and sha256 from its manifest."""
        try:
            manifest = self.source.manifest(remote)
        except PullError as e:
            self.fail(str(e))
            return False
        if remote.size is not None and remote.size != manifest.size:
            self.fail(f"{remote.key}: announced size {remote.size}, manifest says {manifest.size}")
            return False
        remote.size, remote.sha256 = manifest.size, manifest.sha256
        return True

    def _advance_cursor(self, set_name: str, remotes: list[Remote], failed: set[str]) -> None:
        # Up to the first failure only: the next run lists from there again.
        cursor = self.state.cursors.get(set_name, "")
        for remote in remotes:  # oldest first
            if remote.key in failed or remote.key not in self.state.bundles:
                break
            cursor = max(cursor, remote.cursor)
        if cursor:
            self.state.cursors[set_name] = cursor

    def _paths(self, key: str) -> tuple[str, str]:
        final = os.path.join(self.dest, key)
        return final, final + ".part"

    def _pull(self, remote: Remote) -> None:
        final, part = self._paths(remote.key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.isfile(final) and _verified(final, remote):
            # Placed by an earlier run that stopped before saving the state.
            self.progress.skip_bytes(remote.size or 0)
        else:
            self._download(remote, part)
            os.replace(part, final)
            _fsync_dir(os.path.dirname(final))
            self.fetched += 1
            self.fetched_bytes += remote.size or 0
        entry: dict[str, Any] = {"size": remote.size, "sha256": remote.sha256}
        self.state.bundles[remote.key] = entry
        self.state.save()
        if self.unpack:
            self._unpack(remote.key, entry, self.unpack)

    def _download(self, remote: Remote, part: str) -> None:
        size = remote.size or 0
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        if offset > size:
            offset = 0
        resumed = offset > 0
        self.progress.skip_bytes(offset)
        self._fetch_into(remote, part, offset)
        if _verified(part, remote):
            return
        os.unlink(part)
        if resumed:
            # The old partial file may be what was wrong: once more, whole.
            self._fetch_into(remote, part, 0)
            if _verified(part, remote):
                return
            os.unlink(part)
        raise PullError(
            f"{remote.key}: size or sha256 does not match the manifest; the download was deleted"
        )

    def _fetch_into(self, remote: Remote, part: str, offset: int) -> None:
        size = remote.size or 0
        if offset and offset == size:
            return  # complete already; only verification is left
        try:
            chunks, start = self.source.fetch(remote, offset)
        except ResumeRefusedError:
            chunks, start = self.source.fetch(remote, 0)
        mode = "r+b" if os.path.exists(part) else "wb"
        with contextlib.closing(chunks), open(part, mode) as f:
            f.seek(start)
            f.truncate()
            written = start
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
                self.progress.advance(len(chunk))
                if written > size:
                    break  # longer than the manifest says: fails verification
            f.flush()
            os.fsync(f.fileno())
        if written < size:
            # The connection ended early (urllib does not raise for that):
            # keep what came for the next run to resume.
            raise PullError(
                f"{remote.key}: download interrupted at byte {written} of {size}; "
                "the next run resumes it"
            )

    # Unpacking

    def _mbox_path(self, set_name: str) -> str:
        return os.path.join(self.dest, set_name, f"{set_name}.mbox")

    def _catch_up_unpacking(self, sets: list[str]) -> None:
        """Before anything new: finish every unpack an interrupted run left
        (whatever this run's --unpack), and with --unpack, unpack the
        followed sets' bundles that earlier runs fetched without it. Key
        order, so an mbox gets its bundles oldest first."""
        for key, entry in sorted(self.state.bundles.items()):
            unpacked = entry.get("unpacked", {})
            modes = [m for m, done in unpacked.items() if done is False]
            fresh = self.unpack is not None and self.unpack not in unpacked
            if fresh and key.split("/", 1)[0] in sets:
                modes.append(str(self.unpack))
            final, _ = self._paths(key)
            if not modes or not os.path.isfile(final):
                # Moved or deleted after processing: the state file still
                # says it is done, so it is neither fetched nor unpacked.
                continue
            if fresh:
                remote = Remote(key, final, entry.get("size"), entry.get("sha256"))
                try:
                    ok = _verified(final, remote)
                except OSError as e:
                    self.fail(f"{key}: cannot read it to unpack: {e}")
                    continue
                if not ok:
                    self.fail(f"{key}: {final} no longer matches its size and sha256; not unpacked")
                    continue
            for mode in modes:
                self._unpack(key, entry, mode)

    def _unpack(self, key: str, entry: dict[str, Any], mode: str) -> None:
        """Unpack the fetched bundle ``key`` into ``mode``'s target, recorded
        in the state file before (False) and after (True)."""
        final, _ = self._paths(key)
        set_name = key.split("/", 1)[0]
        unpacked = entry.setdefault("unpacked", {})
        if mode == "mbox" and unpacked.get("mbox") is not False:
            # Where this bundle's append begins; an interrupted append is
            # cut back to it.
            target = self._mbox_path(set_name)
            entry["mbox_offset"] = os.path.getsize(target) if os.path.exists(target) else 0
        unpacked[mode] = False
        self.state.save()
        skipped: list[Skipped] = []
        try:
            if mode == "mbox":
                _unpack_mbox(final, self._mbox_path(set_name), entry.get("mbox_offset", 0))
            elif mode == "wire":
                target = os.path.join(self.dest, set_name, WIRE_DIR)
                skipped = _unpack_maildir(final, target, key, wire_bytes)
            else:
                _unpack_maildir(final, os.path.join(self.dest, set_name, "maildir"), key)
        except (OSError, ValueError, EOFError, zlib.error) as e:
            self.fail(f"{key}: unpacking ({mode}): {e}")
            return
        if mode == "wire":
            self._report_skipped(key, skipped)
        # Done even with messages skipped: they have no wire bytes to give,
        # so a later run would only fail on them again.
        unpacked[mode] = True
        self.state.save()

    def _report_skipped(self, key: str, skipped: list[Skipped]) -> None:
        for s in skipped[:MAX_SKIPPED_REPORTED]:
            named = f" ({s.message_id})" if s.message_id else ""
            self.fail(
                f"{key}: unpacking (wire): message {s.index}{named} skipped, "
                f"no wire bytes: {s.error}; its stored form is in the bundle"
            )
        if len(skipped) > MAX_SKIPPED_REPORTED:
            self.fail(
                f"{key}: unpacking (wire): {len(skipped) - MAX_SKIPPED_REPORTED} more "
                f"messages skipped ({len(skipped)} in all)"
            )


def _unpack_mbox(bundle: str, target: str, offset: int) -> None:
    """Append the bundle's mboxrd to ``target``; first cut ``target`` back
    to ``offset``, where this bundle's earlier, interrupted append began."""
    with gzip.open(bundle, "rb") as src:
        head = src.read(5)
        if head and head != b"From ":
            raise ValueError("the bundle is not an mbox")
        with open(target, "ab") as dst:
            dst.truncate(min(offset, os.fstat(dst.fileno()).st_size))
            dst.write(head)
            shutil.copyfileobj(src, dst, CHUNK)
            dst.flush()
            os.fsync(dst.fileno())


@dataclass
class Skipped:
    """A message of a bundle that ``transform`` refused (ValueError)."""

    index: int  # 1-based position in the bundle
    message_id: str | None  # its X-Spamtrap-Id, else its Message-ID
    error: str


# X-Spamtrap-Id first: it is ours, and unique within the corpus.
_ID_FIELDS = re.compile(rb"^(x-spamtrap-id|message-id):[ \t]*([^\r\n]*)", re.I | re.M)
_ID_SCAN = 64 * 1024  # the header section's start is enough to find them


def message_id_of(message: bytes) -> str | None:
    """The stored message's X-Spamtrap-Id, else its Message-ID, else None:
    for naming it in an error (never parsed further)."""
    head = message[:_ID_SCAN]
    end = re.search(rb"\r?\n\r?\n", head)
    found: dict[bytes, str] = {}
    for m in _ID_FIELDS.finditer(head[: end.start()] if end else head):
        value = m.group(2).strip().decode("ascii", "replace")
        if value:
            found.setdefault(m.group(1).lower(), value[:200])
    return found.get(b"x-spamtrap-id") or found.get(b"message-id")


def _unpack_maildir(
    bundle: str, maildir: str, key: str, transform: Callable[[bytes], bytes] | None = None
) -> list[Skipped]:
    """One file per message in ``maildir/new`` (each message through
    ``transform`` first, if given). The names are standard (time.unique.host)
    and derived from the key, so unpacking again after an interruption
    replaces files instead of adding copies. A message ``transform``
    refuses is not written; it is returned, and the rest go on."""
    skipped: list[Skipped] = []
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    m = KEY_RE.fullmatch(key)
    assert m is not None
    stamp = calendar.timegm(time.strptime(m.group("time"), _TIME))
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    with gzip.open(bundle, "rb") as f:
        for i, (_, message) in enumerate(MboxReader(f)):  # type: ignore[arg-type]
            if transform is not None:
                try:
                    message = transform(message)
                except ValueError as e:
                    skipped.append(Skipped(i + 1, message_id_of(message), str(e)))
                    continue
            name = f"{stamp}.R{m.group('random')}Q{i}.{host}"
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as out:
                out.write(message)
            os.replace(tmp, os.path.join(maildir, "new", name))
    return skipped


# -- the command -----------------------------------------------------------------


def _tokens(values: list[str], sets: list[str]) -> dict[str, str] | str:
    """set -> token from ``--token TOKEN`` / ``--token SET=TOKEN`` (and
    SPAMTRAP_TOKEN); an error message if a set has none."""
    default = os.environ.get("SPAMTRAP_TOKEN")
    per_set: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name in sets:
            per_set[name] = rest
        else:
            default = value
    tokens = {}
    for set_name in sets:
        token = per_set.get(set_name, default)
        if not token:
            return f"no token for set {set_name} (--token TOKEN or --token {set_name}=TOKEN)"
        tokens[set_name] = token
    return tokens


def _source(args: argparse.Namespace, err: TextIO) -> Source | None:
    if args.http:
        tokens = _tokens(args.token, args.set)
        if isinstance(tokens, str):
            print(f"spamtrap pull: {tokens}", file=err)
            return None
        try:
            return FeedSource(args.http, tokens, args.timeout)
        except PullError as e:
            print(f"spamtrap pull: --http: {e}", file=err)
            return None
    if args.mail:
        return MailSource(args.mail, args.timeout)
    try:
        return S3Source(args.s3, args.endpoint, args.region, args.timeout)
    except ValueError as e:
        print(f"spamtrap pull: --s3: {e}", file=err)
        return None


def run(args: argparse.Namespace, err: TextIO | None = None) -> int:
    """Run ``spamtrap pull`` with parsed arguments; the exit status."""
    err = err if err is not None else sys.stderr
    bad = [s for s in args.set if not valid_set_name(s)]
    if bad:
        print(f"spamtrap pull: invalid set name {bad[0]!r}", file=err)
        return EXIT_USAGE
    if args.overlap < 0 or args.timeout <= 0:
        print("spamtrap pull: --overlap takes 0 or more seconds, --timeout more than 0", file=err)
        return EXIT_USAGE
    if args.wire and args.unpack != "maildir":
        print("spamtrap pull: --wire needs --unpack maildir (one file per message)", file=err)
        return EXIT_USAGE
    unpack = "wire" if args.wire else args.unpack
    source = _source(args, err)
    if source is None:
        return EXIT_USAGE
    dest = os.path.abspath(args.dest)
    state_path = args.state or os.path.join(dest, STATE_NAME)
    show = args.progress or (not args.quiet and err.isatty())
    progress = Progress(err, show)
    try:
        os.makedirs(dest, exist_ok=True)
        with _locked(state_path):
            puller = Puller(source, dest, State(state_path), unpack, progress, args.overlap)
            try:
                puller.run(list(dict.fromkeys(args.set)))  # each set once
            except KeyboardInterrupt:
                progress.error("interrupted; the next run resumes where this one stopped")
                return EXIT_FAILED
    except (PullError, OSError) as e:
        progress.error(str(e))
        return EXIT_FAILED
    progress.finish(
        f"{puller.fetched} new bundle(s), {_mb(puller.fetched_bytes)} MB"
        + (f"; {puller.failures} error(s)" if puller.failures else "")
    )
    return EXIT_FAILED if puller.failures else EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        metavar="NAME",
        action="append",
        required=True,
        help="a set to follow (repeatable)",
    )
    p.add_argument("--dest", metavar="DIR", required=True, help="where bundles go: DIR/<set>/")
    p.add_argument("--state", metavar="FILE", help=f"the state file (default: DIR/{STATE_NAME})")
    p.add_argument(
        "--unpack",
        choices=("maildir", "mbox"),
        help="also write each message to DIR/<set>/maildir or append to DIR/<set>/<set>.mbox",
    )
    p.add_argument(
        "--wire",
        action="store_true",
        help=(
            f"with --unpack maildir: write each message's exact wire bytes (metadata block "
            f"removed, line ends as sent) to the maildir DIR/<set>/{WIRE_DIR}"
        ),
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print errors only")
    shown.add_argument(
        "--progress", action="store_true", help="show progress even when stderr is no terminal"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--http", metavar="URL", help="a spamtrap node's base URL (its feeds)")
    source.add_argument("--mail", metavar="PATH", help="a maildir or mbox with the list notices")
    source.add_argument("--s3", metavar="URL", help="s3://bucket/prefix of the store")
    p.add_argument(
        "--token",
        metavar="[SET=]TOKEN",
        action="append",
        default=[],
        help="bearer token for --http, for every set or one (default: $SPAMTRAP_TOKEN)",
    )
    p.add_argument(
        "--endpoint", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 or AWS)"
    )
    p.add_argument("--region", metavar="NAME", help="S3 region (default: the AWS configuration)")
    p.add_argument(
        "--overlap",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_OVERLAP,
        help="list from this long before the newest bundle seen (default: one day)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="network timeout (default: 60)",
    )
