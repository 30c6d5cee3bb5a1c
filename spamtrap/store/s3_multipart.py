"""A bundle above ``multipart_threshold`` as an S3 multipart upload: parts
of that size (at least 5 MiB, at most 10,000 parts), up to
``max_concurrency`` parts at a time, aborted when a part fails. The store
(spamtrap.store.s3) hands in its signed-request function and the semaphore
that bounds the bodies in memory and on the wire across all its puts.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.logger import Logger

from spamtrap.store.s3_wire import (
    FileRange,
    S3Error,
    child_text,
    complete_body,
    parse_error,
    parse_xml,
)

log = Logger()

MIB = 1024 * 1024
MIN_PART = 5 * MIB  # S3's smallest part (all but the last)
MAX_PARTS = 10_000  # S3's most parts per upload
BUNDLE_TYPE = "application/gzip"
# Keys never change once written: caches and CDNs may keep them forever.
IMMUTABLE = "public, max-age=31536000, immutable"

# S3Store._request: (method, object key, operation, query=, headers=, body=)
# -> (response, body); S3Error unless 2xx.
Request = Callable[..., Coroutine[Any, Any, tuple[Any, bytes]]]


def part_size(threshold: int, size: int) -> int:
    """Parts of ``threshold`` bytes (at least 5 MiB), larger if a file of
    ``size`` bytes would otherwise need more than 10,000 of them."""
    return max(threshold, MIN_PART, -(-size // MAX_PARTS))


class MultipartUpload:
    """One object, ``path`` of ``size`` bytes, in parts of ``step`` bytes."""

    def __init__(
        self,
        request: Request,
        transfers: DeferredSemaphore,
        concurrency: int,
        bucket: str,
        object_key: str,
    ) -> None:
        self._request = request
        self._transfers = transfers
        self._concurrency = concurrency
        self._object_key = object_key
        self._where = f"s3://{bucket}/{object_key}"

    async def put(self, path: str, size: int, step: int) -> None:
        _, answer = await self._request(
            "POST",
            self._object_key,
            "CreateMultipartUpload",
            query={"uploads": None},
            headers={"Content-Type": BUNDLE_TYPE, "Cache-Control": IMMUTABLE},
        )
        root = parse_xml(answer)
        upload_id = child_text(root, "UploadId") if root is not None else None
        if not upload_id:
            raise S3Error(
                200, "MalformedResponse", "no UploadId", self._where, "CreateMultipartUpload"
            )
        ranges = [
            (number, FileRange(path, offset, min(step, size - offset)))
            for number, offset in enumerate(range(0, size, step), start=1)
        ]
        try:
            etags = await self._upload_parts(upload_id, ranges)
            await self._complete(upload_id, etags)
        except BaseException:
            self._abort(upload_id)
            raise

    async def _upload_parts(
        self, upload_id: str, ranges: list[tuple[int, FileRange]]
    ) -> dict[int, str]:
        etags: dict[int, str] = {}
        todo = iter(ranges)
        failed = False

        async def lane() -> None:
            # Lanes share one iterator: each part is sent once, in order.
            nonlocal failed
            for number, body in todo:
                if failed:
                    return
                try:
                    etags[number] = await self._upload_part(upload_id, number, body)
                except BaseException:
                    failed = True
                    raise

        lanes = [ensureDeferred(lane()) for _ in range(min(self._concurrency, len(ranges)))]
        results = await DeferredList(lanes, consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()  # type: ignore[attr-defined]
        return etags

    async def _upload_part(self, upload_id: str, number: int, body: FileRange) -> str:
        await self._transfers.acquire()
        try:
            response, _ = await self._request(
                "PUT",
                self._object_key,
                f"UploadPart {number}",
                query={"partNumber": str(number), "uploadId": upload_id},
                body=body,
            )
        finally:
            self._transfers.release()
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
        if not etag:
            raise S3Error(
                response.code, "MalformedResponse", "no ETag", self._where, f"UploadPart {number}"
            )
        return etag

    async def _complete(self, upload_id: str, etags: dict[int, str]) -> None:
        response, answer = await self._request(
            "POST",
            self._object_key,
            "CompleteMultipartUpload",
            query={"uploadId": upload_id},
            headers={"Content-Type": "application/xml"},
            body=complete_body(etags),
        )
        # S3 may answer 200 and fail later in the body.
        code, message = parse_error(answer)
        if code is not None:
            raise S3Error(response.code, code, message, self._where, "CompleteMultipartUpload")

    def _abort(self, upload_id: str) -> None:
        """Best effort, in the background: the retry must not wait for it.
        Uploads it misses are for a bucket lifecycle rule to clean up."""
        d: Deferred[tuple[Any, bytes]] = ensureDeferred(
            self._request(
                "DELETE", self._object_key, "AbortMultipartUpload", query={"uploadId": upload_id}
            )
        )
        d.addErrback(
            lambda f: log.warn(
                "could not abort multipart upload {id} of {key}: {error}",
                id=upload_id,
                key=self._object_key,
                error=f.getErrorMessage(),
            )
        )
