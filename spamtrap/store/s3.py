"""The S3 store: bundles in AWS S3 or any S3-compatible server, never blocking.

botocore does what it is the reference for: the credential chain and SigV4
signing (``S3SigV4Auth`` on an ``AWSRequest``). treq sends the signed
requests from the reactor. Everything that can block runs in the thread
pool: resolving credentials once (file reads, maybe IMDS), refreshing them
(botocore does that inside ``get_frozen_credentials``, called when signing),
reading the spool file, and hashing each body for its signature (the payload
sha256 is always signed, so the server checks every byte it stores).

A bundle at or below ``multipart_threshold`` is one PUT; above it, a
multipart upload in parts of that size (at least 5 MiB), up to
``max_concurrency`` parts at a time, aborted when a part fails
(spamtrap.store.s3_multipart). What S3 says and takes, the XML, the error,
the store URL and endpoint, is in spamtrap.store.s3_wire. The object is
complete before the manifest, the commit marker, is written. Failures raise
:class:`S3Error` and nothing is retried here: the caller (the bundle set)
retries the whole ``put`` with backoff.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from treq.client import HTTPClient
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from spamtrap.bundle.manifest import Manifest
from spamtrap.config import StoreConfig
from spamtrap.interfaces import NetworkReactor, as_reactor_from_threads
from spamtrap.store import (
    BUNDLE_SUFFIX,
    INDEX_SUFFIX,
    KEY_RE,
    MANIFEST_SUFFIX,
    Download,
    Redirect,
    StoreClosedError,
    valid_set_name,
)
from spamtrap.store.s3_multipart import BUNDLE_TYPE, IMMUTABLE, MultipartUpload, part_size
from spamtrap.store.s3_wire import (
    DEFAULT_REGION,
    Body,
    FileRange,
    S3Error,
    aws_endpoint,
    child_text,
    local_name,
    parse_error,
    parse_s3_url,
    parse_xml,
    query_string,
    resolve_endpoint,
    transport_error,
)

if TYPE_CHECKING:
    from treq._types import _ITreqReactor

log = Logger()

MANIFEST_TYPE = "application/json"
INDEX_TYPE = "application/x-ndjson"
# Seconds allowed for one request: a minute plus 1 s per 256 KiB of body,
# so a hung server fails the attempt (and the caller retries).
BASE_TIMEOUT = 60.0
TIMEOUT_BYTES_PER_SECOND = 256 * 1024
MANIFEST_FETCHES = 8  # manifests fetched at once by a listing


# -- the store ------------------------------------------------------------------


class S3Store:
    # Objects are public by key in the bucket: this node's web server only
    # redirects to them (open_download: Redirect).
    served_by_web = False

    def __init__(
        self,
        bucket: str,
        prefix: str,
        reactor: NetworkReactor,
        pool: ThreadPool,
        config: StoreConfig | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        credentials: Any = None,
        agent: IAgent | None = None,
    ) -> None:
        """``credentials`` (botocore Credentials) replaces the AWS chain;
        ``agent`` replaces the HTTP agent (tests record requests with it)."""
        config = config if config is not None else StoreConfig()
        env = os.environ if environ is None else environ
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._reactor = reactor
        self._threads = as_reactor_from_threads(reactor)  # the pool's way back
        self._pool = pool
        self._endpoint = resolve_endpoint(config, env)
        self._region: str | None = (
            config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        )
        self._path_style = config.path_style
        self._public_url = config.public_url.rstrip("/") if config.public_url else None
        self._threshold = config.multipart_threshold
        self._concurrency = max(1, config.max_concurrency)
        # Bounds the bodies in memory and on the wire, across all puts.
        self._transfers = DeferredSemaphore(self._concurrency)
        self._credentials = credentials
        self._resolved = False
        self.list_page_size = 1000  # keys per ListObjectsV2 page (S3's most)
        self._connections: HTTPConnectionPool | None = None
        # put and list_manifests in progress, cancelled by close().
        self._in_flight: set[Deferred[Any]] = set()
        self._closed = False
        if agent is None:
            self._connections = HTTPConnectionPool(reactor, persistent=True)
            self._connections.maxPersistentPerHost = self._concurrency + 2
            # cast: mypy does not know zope's implementer() without mypy-zope.
            self._http = HTTPClient(cast(IAgent, Agent(reactor, pool=self._connections)))
        else:
            self._http = HTTPClient(agent)

    @classmethod
    def from_url(
        cls, url: str, reactor: NetworkReactor, pool: ThreadPool, config: StoreConfig | None = None
    ) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, reactor, pool, config)

    # -- naming ---------------------------------------------------------------

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _bucket_url(self) -> str:
        endpoint = self._endpoint or aws_endpoint(self._region or DEFAULT_REGION)
        if self._path_style:
            return f"{endpoint}/{quote(self.bucket, safe='')}"
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}"

    def _url(self, object_key: str, query: Mapping[str, str | None] | None = None) -> str:
        base = self._bucket_url()
        if object_key:
            url = f"{base}/{quote(object_key, safe='/')}"
        else:
            url = base if self._path_style else base + "/"
        return f"{url}?{query_string(query)}" if query else url

    def url(self, key: str) -> str | None:
        """Where consumers fetch ``key`` without credentials."""
        object_key = self.object_key(key)
        if self._public_url:
            return f"{self._public_url}/{quote(object_key, safe='/')}"
        if self._endpoint is None and self._region is None:
            return None  # AWS, region not read from the AWS config yet
        return self._url(object_key)

    def open_download(self, key: str) -> Download:
        """A redirect to the public object: no byte of a bundle passes
        through this node. None for a malformed key or without a URL."""
        url = self.url(key) if KEY_RE.fullmatch(key) else None
        return Redirect(url) if url is not None else None

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._in_flight.add(d)

        def done(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(done)

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.describe()} is closed")

    def describe(self) -> str:
        where = self._endpoint or (
            aws_endpoint(self._region) if self._region else "AWS S3 (region from the AWS config)"
        )
        return f"s3 bucket {self.bucket} prefix {self.prefix or '(none)'} at {where}"

    # -- credentials and signing (pool) -----------------------------------------

    def _ready(self, key: str) -> Deferred[None]:
        """Resolve credentials and region once, in the pool (file reads,
        maybe the instance metadata service). A failure is retried by the
        next call."""
        if self._resolved:
            return succeed(None)
        d = deferToThreadPool(self._threads, self._pool, self._resolve, key)
        return d.addCallback(self._set_resolved)

    def _resolve(self, key: str) -> tuple[Any, str]:
        session = botocore.session.get_session()
        credentials = self._credentials or session.get_credentials()
        if credentials is None:
            raise S3Error(
                0,
                "NoCredentials",
                "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE and ~/.aws/credentials, or an instance role)",
                f"s3://{self.bucket}/{self.object_key(key)}",
                "resolving credentials",
            )
        region = self._region or session.get_config_variable("region") or DEFAULT_REGION
        return credentials, region

    def _set_resolved(self, resolved: tuple[Any, str]) -> None:
        self._credentials, self._region = resolved
        self._resolved = True

    def _sign(
        self, method: str, url: str, headers: dict[str, str], body: Body
    ) -> tuple[bytes, dict[str, str]]:
        """In the pool: read the body if it is a file range, hash and sign."""
        data = body.read() if isinstance(body, FileRange) else body
        request = AWSRequest(method=method, url=url, headers=headers, data=data)
        # get_frozen_credentials refreshes expiring credentials (may block).
        frozen = self._credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        return data, dict(request.headers.items())

    # -- requests (reactor) -------------------------------------------------------

    async def _request(
        self,
        method: str,
        object_key: str,
        operation: str,
        *,
        query: Mapping[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
        body: Body = b"",
    ) -> tuple[Any, bytes]:
        """Sign (in the pool), send, read the answer; S3Error unless 2xx."""
        url = self._url(object_key, query)
        where = f"s3://{self.bucket}/{object_key}"
        data, signed_headers = await deferToThreadPool(
            self._threads, self._pool, self._sign, method, url, dict(headers or {}), body
        )
        signed: dict[bytes | str, bytes | str] = {k: v for k, v in signed_headers.items()}
        try:
            response = await self._http.request(
                method,
                url,
                headers=signed,
                data=data or None,
                allow_redirects=False,
                # cast: treq names its reactor with zope interfaces (see interfaces.py).
                reactor=cast("_ITreqReactor", self._reactor),
                timeout=BASE_TIMEOUT + len(data) / TIMEOUT_BYTES_PER_SECOND,
            )
            content = await response.content()
        except Exception as e:  # noqa: BLE001 - every transport failure becomes an S3Error
            if self._closed:
                raise StoreClosedError(f"{operation} of {where}: the store was closed") from e
            code, reason = transport_error(e)
            raise S3Error(0, code, f"{reason} ({url})", where, operation) from e
        if not 200 <= response.code < 300:
            error_code, message = parse_error(content)
            code = error_code or f"HTTP{response.code}"
            raise S3Error(response.code, code, message, where, operation)
        return response, content

    # -- put -------------------------------------------------------------------

    def put(self, key: str, path: str, manifest: bytes, index: str | None = None) -> Deferred[None]:
        return self._track(ensureDeferred(self._put(key, path, manifest, index)))

    async def _put(self, key: str, path: str, manifest: bytes, index: str | None) -> None:
        self._refuse_if_closed()
        if KEY_RE.fullmatch(key) is None or not key.endswith(BUNDLE_SUFFIX):
            raise ValueError(f"not a bundle key: {key!r}")
        await self._ready(key)
        object_key = self.object_key(key)
        size = await deferToThreadPool(self._threads, self._pool, os.path.getsize, path)
        if size > self._threshold:
            upload = MultipartUpload(
                self._request, self._transfers, self._concurrency, self.bucket, object_key
            )
            await upload.put(path, size, self.part_size(size))
        else:
            await self._put_single(object_key, FileRange(path, 0, size))
        if index is not None:
            await self._put_index(object_key[: -len(BUNDLE_SUFFIX)] + INDEX_SUFFIX, index)
        # Only now, with the object and its index complete, the commit marker.
        manifest_object = object_key[: -len(BUNDLE_SUFFIX)] + MANIFEST_SUFFIX
        await self._request(
            "PUT",
            manifest_object,
            "PutObject (manifest)",
            headers={"Content-Type": MANIFEST_TYPE, "Cache-Control": IMMUTABLE},
            body=manifest,
        )

    async def _put_index(self, object_key: str, path: str) -> None:
        # An index is a few hundred bytes per message: one PUT, never parts.
        size = await deferToThreadPool(self._threads, self._pool, os.path.getsize, path)
        await self._transfers.acquire()
        try:
            await self._request(
                "PUT",
                object_key,
                "PutObject (index)",
                headers={"Content-Type": INDEX_TYPE, "Cache-Control": IMMUTABLE},
                body=FileRange(path, 0, size),
            )
        finally:
            self._transfers.release()

    async def _put_single(self, object_key: str, body: FileRange) -> None:
        await self._transfers.acquire()
        try:
            await self._request(
                "PUT",
                object_key,
                "PutObject",
                headers={"Content-Type": BUNDLE_TYPE, "Cache-Control": IMMUTABLE},
                body=body,
            )
        finally:
            self._transfers.release()

    def part_size(self, size: int) -> int:
        """Parts of ``multipart_threshold`` bytes (at least 5 MiB), larger
        if the file would otherwise need more than 10,000 of them."""
        return part_size(self._threshold, size)

    # -- listing -------------------------------------------------------------------

    def list_manifests(self, set_name: str) -> Deferred[list[Manifest]]:
        """The parsed manifests of a set, newest first (by key), as
        LocalStore.list_manifests gives them; the requests go out from the
        reactor, the signing runs in the store's pool. Listing needs the
        credentials: anonymous users may only read objects whose key they
        know."""
        return self._track(ensureDeferred(self._list_manifests(set_name)))

    async def _list_manifests(self, set_name: str) -> list[Manifest]:
        self._refuse_if_closed()
        if not valid_set_name(set_name):
            raise ValueError(f"invalid set name {set_name!r}")
        await self._ready(f"{set_name}/")
        keys = sorted(await self._list_keys(f"{set_name}/"), reverse=True)
        keys = [k for k in keys if k.endswith(MANIFEST_SUFFIX) and KEY_RE.fullmatch(k)]
        fetches = DeferredSemaphore(MANIFEST_FETCHES)
        results = await DeferredList(
            [fetches.run(lambda k: ensureDeferred(self._get_manifest(k)), k) for k in keys],
            consumeErrors=True,
        )
        docs = []
        for ok, result in results:
            if not ok:
                result.raiseException()  # type: ignore[union-attr] # an outage fails it
            if result is not None:
                docs.append(result)
        return docs

    async def _list_keys(self, key_prefix: str) -> list[str]:
        """Every key under ``key_prefix`` (keys relative to the store prefix)."""
        strip = len(self.object_key(""))
        query: dict[str, str | None] = {
            "list-type": "2",
            "max-keys": str(self.list_page_size),
            "prefix": self.object_key(key_prefix),
        }
        keys: list[str] = []
        while True:
            _, answer = await self._request("GET", "", "ListObjectsV2", query=query)
            root = parse_xml(answer)
            if root is None:
                raise S3Error(200, "MalformedResponse", "not XML", key_prefix, "ListObjectsV2")
            for entry in root:
                if local_name(entry.tag) == "Contents":
                    keys.append((child_text(entry, "Key") or "")[strip:])
            token = child_text(root, "NextContinuationToken")
            if child_text(root, "IsTruncated") != "true" or not token:
                return keys
            query["continuation-token"] = token

    async def _get_manifest(self, key: str) -> Manifest | None:
        try:
            _, body = await self._request("GET", self.object_key(key), "GetObject (manifest)")
        except S3Error as e:
            if e.status == 404:
                return None  # deleted since the listing
            raise
        try:
            return Manifest.from_json(body, f"manifest {key}")
        except ValueError:  # ManifestError too
            return None  # one damaged manifest must not fail the listing

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """At service stop: cancel the puts and listings in flight (a
        cancelled put fails with StoreClosedError; its bundle stays for the
        next start), close kept-alive connections, stop the pool."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        self._closed = True
        for d in list(self._in_flight):
            d.cancel()
        if self._connections is not None:
            await self._connections.closeCachedConnections()
        if not getattr(self._pool, "joined", True):
            self._pool.stop()
