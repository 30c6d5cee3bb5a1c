"""One rule for what consumers are told: the web layer's listings and the
notices give the same download URL for a bundle (none for an S3 store
without one), and ``spamtrap pull`` recognises exactly the Subject the
daemon writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IAgent

from spamtrap import testing
from spamtrap.bundle.manifest import Manifest, Published
from spamtrap.cli.pull_sources import read_notice
from spamtrap.config import Config, SetConfig, StoreConfig
from spamtrap.metrics import Metrics
from spamtrap.notify import notice_urls
from spamtrap.notify.mail import notice
from spamtrap.store import BUNDLE_SUFFIX, NAME_PATTERN, served_by_web
from spamtrap.store.local import LocalStore
from spamtrap.store.published import download_url, subject, subject_set
from spamtrap.store.s3 import S3Store
from spamtrap.web import make_site
from tests.support.web import (
    TOKEN,
    FakeStore,
    InlineReactor,
    listing_request,
    private_manifests,
    render,
)

PUBLIC_URL = "https://traps.example.org/spamtrap/"


class ListedS3Store(S3Store):
    """A real S3Store on AWS with no region known (``url`` answers None)
    whose listing is given: the listing needs a server, the URL does not."""

    def __init__(self, manifests: list[Manifest]) -> None:
        super().__init__(
            "trapbucket",
            "spam",
            reactor,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            StoreConfig(),
            environ={},
            agent=cast(IAgent, object()),
        )
        self.manifests = manifests

    def list_manifests(self, set_name: str) -> Deferred[list[Manifest]]:
        return succeed(self.manifests if set_name == "private" else [])


def site_config(store_url: str | None) -> Config:
    config = testing.config(
        http__public_url=PUBLIC_URL,
        store__url=store_url,
        sets=[SetConfig(name="private", token=TOKEN, private=True)],
    )
    return config


def listed_urls(store: Any, config: Config) -> list[str | None]:
    site = make_site(store, config, Metrics(), dict, InlineReactor())
    request = listing_request()
    render(site, request)  # both stores answer their listing at once
    assert request.responseCode in (None, 200), b"".join(request.written)
    return [b["url"] for b in json.loads(b"".join(request.written))["bundles"]]


def test_served_by_web_is_the_local_store_only() -> None:
    # Decided once, by each store class; the URL only picks the class.
    assert served_by_web(None) and served_by_web("file:///srv/spamtrap/bundles")
    assert not served_by_web("s3://trapbucket/spam")
    assert served_by_web(None) is LocalStore.served_by_web
    assert served_by_web("s3://trapbucket/spam") is S3Store.served_by_web


def test_download_url() -> None:
    key = "all/2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.mbox.gz"
    s3 = f"https://cdn.example/{key}"
    assert download_url(key, s3, PUBLIC_URL, True) == s3
    assert download_url(key, s3, PUBLIC_URL, False) == s3
    assert download_url(key, None, PUBLIC_URL, True) == (
        f"https://traps.example.org/spamtrap/bundles/{key}"
    )
    assert download_url(key, None, PUBLIC_URL, False) is None
    assert download_url(key, "", PUBLIC_URL, False) is None


def test_an_s3_listing_without_urls_names_none(tmp_path: Path) -> None:
    manifests = private_manifests()
    store = ListedS3Store(manifests)
    assert store.url(manifests[0].key) is None  # the case in question
    config = site_config("s3://trapbucket/spam")
    # Not this node's /bundles/<key>: that only redirects to store.url(),
    # which is None, so the download would answer 404.
    assert listed_urls(store, config) == [None] * len(manifests)
    for m in manifests:
        assert notice_urls(Published(m, store.url(m.key)), PUBLIC_URL, False) == (None, None)


def test_listing_and_notices_agree_for_the_local_store(tmp_path: Path) -> None:
    manifests = private_manifests()
    config = site_config(None)
    urls = listed_urls(FakeStore(tmp_path, {"private": manifests}), config)
    assert urls == [f"https://traps.example.org/spamtrap/bundles/{m.key}" for m in manifests]
    for m, url in zip(manifests, urls, strict=True):
        # BundleSet hands the notifier store.url(key): None for the local store.
        assert notice_urls(Published(m, None), PUBLIC_URL, True)[0] == url


set_names = st.from_regex(f"\\A{NAME_PATTERN}\\Z", fullmatch=True).filter(lambda s: len(s) < 60)


@given(
    set_name=set_names,
    messages=st.integers(0, 10**9),
    prefix=st.sampled_from(["", "[trap-list] ", "Re: ", "Fwd: [x] "]),
)
def test_pull_reads_the_set_of_every_subject_the_daemon_writes(
    set_name: str, messages: int, prefix: str
) -> None:
    doc = {
        "set": set_name,
        "messages": messages,
        "first_received": "2026-01-01T00:00:00Z",
        "last_received": "2026-01-01T01:00:00Z",
    }
    assert subject_set(prefix + subject(doc)) == set_name


@pytest.mark.parametrize("subject_text", ["[spamtrap] all: many messages, x", "spamtrap all: 1"])
def test_other_subjects_name_no_set(subject_text: str) -> None:
    assert subject_set(subject_text) is None


def test_a_notice_whose_body_was_lost_is_still_known_by_its_subject() -> None:
    key = f"all/2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA{BUNDLE_SUFFIX}"
    doc = {
        "set": "all",
        "key": key,
        "url": None,
        "size": 1,
        "sha256": "0" * 64,
        "messages": 3,
        "first_received": "2026-01-01T00:00:00Z",
        "last_received": "2026-01-01T01:00:00Z",
        "node": "node1",
        "format": 1,
    }
    raw = notice(doc, "spamtrap@trap.example", "list@lists.test", 0.0)
    head = raw.split(b"\n\n", 1)[0] + b"\n\n"  # a list that kept only the headers
    found = read_notice(head)
    assert found is not None and found.subject_set == "all" and "key" not in found.fields
