"""spamtrap pull's sources: a node's feeds over HTTP, a folder of list
notices, an S3 bucket."""

from __future__ import annotations

import contextlib
import email
import email.policy
import http.client
import mailbox
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import IO, Any

from spamtrap import __version__
from spamtrap.cli.pull_remote import (
    CHUNK,
    SHA256,
    Problem,
    PullError,
    Remote,
    RemoteManifest,
    ResumeRefusedError,
    bundle_key,
    index_name,
    manifest_index,
    manifest_name,
    parse_json,
    remote_manifest,
)
from spamtrap.store import BUNDLE_SUFFIX, MANIFEST_SUFFIX
from spamtrap.store.published import subject_set

PAGE = 500  # feed entries asked for per request
USER_AGENT = f"spamtrap-pull/{__version__}"


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


class UrlSource:
    """Bundles fetched by URL, manifests (``.json``) and indexes
    (``.index.jsonl``) beside them unless a listing names their URLs.
    Public for ``spamtrap stats``, which reads a node's listings and
    indexes with it (:meth:`get`, :meth:`fetch_index`)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    @staticmethod
    def _beside(remote: Remote, given: str | None, name: Callable[[str], str], what: str) -> str:
        """The URL of the bundle's manifest or index: as the source gave it,
        or named beside the bundle's own URL."""
        if given is not None:
            return given or remote.location
        if not remote.location.endswith(BUNDLE_SUFFIX):
            raise PullError(f"{remote.key}: no {what} URL for {remote.location}")
        return name(remote.location)

    def manifest(self, remote: Remote) -> RemoteManifest:
        url = self._beside(remote, remote.manifest_location, manifest_name, "manifest")
        return remote_manifest(self.get(url), remote)

    def fetch_index(self, remote: Remote) -> bytes:
        url = self._beside(remote, remote.index_location, index_name, "index")
        try:
            return self.get(url)
        except PullError as e:
            raise PullError(f"{remote.key}: index: {e}")

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

    def get(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        """The body at ``url`` (http or https), with ``headers`` added to
        the request; PullError naming the URL otherwise."""
        try:
            with _http_get(url, self.timeout, headers) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as e:
            e.close()
            raise PullError(f"{url}: HTTP {e.code} {e.reason}")
        except OSError as e:
            raise PullError(f"{url}: {e}")


def remote_from(entry: dict[str, Any], set_name: str, what: str) -> Remote | Problem:
    """A Remote of set ``set_name`` from a listing's entry, a feed's or a
    notice's (``url``, ``key``, ``size``, ``sha256`` and optionally
    ``manifest_url``, ``index``, ``index_sha256``, ``index_url``), or the
    Problem that makes it unusable; ``what`` names the entry in the
    problem's text. Public for ``spamtrap stats``."""
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
    index_url = entry.get("index_url") or None
    checks = (("URL", url), ("manifest URL", manifest_url), ("index URL", index_url))
    for name, value in checks:
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
        if SHA256.fullmatch(sha) is None:
            return Problem(
                f"{what}: the sha256 {str(entry.get('sha256'))!r} is not 64 hex digits", key
            )
    try:
        index_sha = manifest_index(entry, key)
    except PullError as e:
        return Problem(f"{what}: {e}", key)
    return Remote(
        key,
        str(url),
        size,
        sha,
        str(manifest_url) if manifest_url else None,
        index_sha,
        str(index_url) if index_url else None,
    )


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


class FeedSource(UrlSource):
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
                page = parse_json(self.get(url, headers), f"feed of set {set_name}")
            except PullError as e:
                raise PullError(f"set {set_name}: {e}")
            entries = page.get("bundles")
            if not isinstance(entries, list):
                raise PullError(f"set {set_name}: feed answer without bundles")
            for entry in entries:
                what = f"set {set_name}: feed entry"
                if isinstance(entry, dict):
                    results.append(remote_from(entry, set_name, what))
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


class MailSource(UrlSource):
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
            # The index is fetched beside the bundle and checked against
            # Index-SHA256, as a manifest's or feed entry's index is.
            entry = {
                **fields,
                "manifest_url": fields.get("manifest-url"),
                "index_sha256": fields.get("index-sha256"),
            }
            results.append(remote_from(entry, set_name, what))
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

        key = manifest_name(remote.location)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                data = body.read()
        except (BotoCoreError, ClientError) as e:
            raise PullError(f"{remote.key}: manifest s3://{self.bucket}/{key}: {e}")
        return remote_manifest(data, remote)

    def fetch_index(self, remote: Remote) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = index_name(remote.location)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                data: bytes = body.read()
        except (BotoCoreError, ClientError) as e:
            raise PullError(f"{remote.key}: index s3://{self.bucket}/{key}: {e}")
        return data

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
