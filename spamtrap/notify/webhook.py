"""Webhooks: a JSON POST per stored bundle, shaped like an S3 event record.

Tools that already consume S3 "ObjectCreated" notifications (Lambda-style
handlers, queue consumers) can read it unchanged; the full manifest and the
download URLs (``url``, ``manifest_url``) ride along under ``"spamtrap"``.
With a secret, the exact body bytes are signed:
``X-Spamtrap-Signature: sha256=<hex HMAC-SHA256>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet.defer import Deferred

from spamtrap.config import WebhookConfig
from spamtrap.message import iso_time

ATTEMPT_TIMEOUT = 30.0  # connect, send, and read the whole answer
SIGNATURE_HEADER = "X-Spamtrap-Signature"


class WebhookStatusError(Exception):
    """The receiver answered, but not with a 2xx."""

    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP status {code}")
        self.code = code


def event(manifest: Mapping[str, object], now: float, bucket: str, object_key: str) -> bytes:
    """The POST body: one S3-style ObjectCreated record for one bundle."""
    record = {
        "eventVersion": "2.1",
        "eventSource": "spamtrap",
        "eventTime": iso_time(now),
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": bucket},
            "object": {
                "key": object_key,
                "size": manifest["size"],
                "sha256": manifest["sha256"],
            },
        },
        "spamtrap": manifest,
    }
    return json.dumps({"Records": [record]}, ensure_ascii=True).encode("ascii")


def signature(secret: str, body: bytes) -> str:
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def describe_url(url: str) -> str:
    """A webhook URL for logs, without the parts that may hold a token:
    user info, query and fragment."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class WebhookSender:
    """POSTs one body per ``send`` call with a treq-like client."""

    def __init__(self, http_client: Any, clock: Any) -> None:
        self._http = http_client
        self._clock = clock

    def send(self, hook: WebhookConfig, body: bytes) -> Deferred[None]:
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [b"spamtrap"],
        }
        if hook.secret is not None:
            headers[SIGNATURE_HEADER.encode("ascii")] = [signature(hook.secret, body).encode()]
        # No redirects: the signed notice goes to the configured URL only.
        d: Deferred[Any] = self._http.post(
            hook.url, data=body, headers=headers, allow_redirects=False
        )
        d.addCallback(self._check)
        # Cancelling a treq request aborts its connection.
        d.addTimeout(ATTEMPT_TIMEOUT, self._clock)
        return d

    def _check(self, response: Any) -> Deferred[None]:
        # Read the answer to the end so the connection is released.
        d: Deferred[Any] = treq.content(response)

        def status(_: object) -> None:
            if not 200 <= response.code < 300:
                raise WebhookStatusError(response.code)

        return d.addCallback(status)
