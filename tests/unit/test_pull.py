"""``spamtrap pull`` without a server: usage errors, notice mail parsing,
the remote manifest it accepts or refuses, and rewinding a partial file.
Against real HTTP and S3 servers: tests/integration/test_pull.py."""

from __future__ import annotations

import hashlib
import json
import mailbox
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.bundle.manifest import Manifest
from spamtrap.cli.main import main
from spamtrap.cli.pull_remote import Problem, PullError, Remote, RemoteManifest, remote_manifest
from spamtrap.cli.pull_sources import MailSource, UrlSource, read_notice, remote_from
from spamtrap.cli.pull_state import rewind
from tests.support.pull import T0, manifest, pull, stored

FIELD_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "http://127.0.0.1/x.mbox.gz",
            "shared/2026-01-01T00:00:00.n.AAAAAAAAAAAAAAAA.mbox.gz",
            "12",
            "a" * 64,
        ]
    ),
)
REMOTE_KEY = "shared/2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.mbox.gz"


@pytest_twisted.ensureDeferred
async def test_a_notice_folder_that_is_none_is_an_error(tmp_path: Path) -> None:
    not_mbox = tmp_path / "notes.txt"
    not_mbox.write_text("Set: shared\nKey: x\n")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    empty = tmp_path / "empty.mbox"
    empty.write_bytes(b"")
    dest = str(tmp_path / "d")
    for path, text in [(not_mbox, "not an mbox file"), (plain_dir, "not a maildir")]:
        code, err = await pull("--set", "shared", "--dest", dest, "--mail", str(path))
        assert code == 1 and text in err and str(path) in err, err
    # An empty mbox is a folder no notice has reached yet.
    assert await pull("--set", "shared", "--dest", str(tmp_path / "d"), "--mail", str(empty)) == (
        0,
        "",
    )


def test_a_skipped_messages_id_is_ours_first_then_its_own() -> None:
    from spamtrap.cli.pull_unpack import message_id_of

    ours = stored(b"Message-ID: <theirs@spam.example>\r\n\r\nbody\r\n", "unix")
    assert message_id_of(ours) == "id1"
    assert message_id_of(b"Subject: x\r\nMessage-Id:  <m@x> \r\n\r\nbody") == "<m@x>"
    # Only the header section counts, and no id is no id.
    assert message_id_of(b"Subject: x\n\nMessage-ID: <in-body@x>\n") is None
    assert message_id_of(b"") is None


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=2000))
def test_any_mail_reads_as_a_notice_or_none(raw: bytes) -> None:
    notice = read_notice(raw)
    assert notice is None or "key" in notice.fields or notice.subject_set is not None


@settings(max_examples=300, deadline=None)
@given(
    entry=st.dictionaries(
        st.sampled_from(["key", "url", "size", "sha256", "manifest_url"]), FIELD_TEXT
    )
)
def test_a_notice_entry_is_a_remote_or_a_named_problem(entry: dict[str, str]) -> None:
    result = remote_from(entry, "shared", "notice <x@test>")
    if isinstance(result, Problem):
        assert result.text.startswith("notice <x@test>")
        return
    # Whatever passes is safe to use: a key naming a file under DEST/shared,
    # an http(s) URL, and a size and sha256 that can be checked.
    assert result.key.startswith("shared/") and ".." not in result.key
    assert result.location.split("://")[0] in ("http", "https")
    assert result.size is None or result.size >= 0
    assert result.sha256 is None or len(result.sha256) == 64


def test_read_notice_reads_the_daemons_own_notices() -> None:
    from spamtrap.notify.mail import notice as daemon_notice

    key = "shared/2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.mbox.gz"
    doc = json.loads(manifest(key, b"data", 1, T0))
    doc["url"] = f"http://127.0.0.1:8025/bundles/{key}"
    raw = daemon_notice(doc, "spamtrap@trap.example", "list@example.org", T0)
    notice = read_notice(raw)
    assert notice is not None and notice.subject_set == "shared"
    fields = notice.fields
    assert (fields["set"], fields["key"], fields["url"]) == ("shared", key, doc["url"])
    assert (fields["size"], fields["sha256"]) == ("4", doc["sha256"])


def test_a_notice_names_the_bundles_index_and_mail_pull_takes_it(tmp_path: Path) -> None:
    from spamtrap.notify.mail import notice as daemon_notice

    key = "shared/2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.mbox.gz"
    sha = "ab" * 32
    doc = json.loads(manifest(key, b"data", 1, T0))
    indexed = {
        **doc,
        "index": "2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.index.jsonl",
        "index_sha256": sha,
        "url": f"http://127.0.0.1:8025/bundles/{key}",
    }
    raw = daemon_notice(indexed, "spamtrap@trap.example", "list@example.org", T0)
    body = raw.split(b"\n\n", 1)[1]
    assert body.endswith(
        b"Index: 2026-01-01T00:00:00.node1.AAAAAAAAAAAAAAAA.index.jsonl\n"
        + b"Index-SHA256: "
        + sha.encode()
        + b"\n"
    )
    # A bundle stored without an index: neither field.
    plain = daemon_notice({**doc, "url": indexed["url"]}, "s@t.example", "l@t.example", T0)
    assert b"Index" not in plain
    box = mailbox.mbox(str(tmp_path / "notices"))
    box.add(raw)
    box.add(plain.replace(b"AAAAAAAAAAAAAAAA", b"BBBBBBBBBBBBBBBB"))
    bad = raw.replace(b"AAAAAAAAAAAAAAAA", b"CCCCCCCCCCCCCCCC")
    box.add(bad.replace(b"Index-SHA256: ab", b"Index-SHA256: zz"))
    box.close()
    remotes, problems = MailSource(str(tmp_path / "notices"), 1.0).listing("shared", None)
    assert [(r.key, r.index_sha256, r.index_location) for r in remotes] == [
        (key, sha, None),  # fetched beside the bundle, checked like a manifest's
        (key.replace("AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB"), None, None),
    ]
    (problem,) = problems
    assert "CCCCCCCCCCCCCCCC" in problem.text and "index_sha256: 'zzab" in problem.text


def test_read_notice_reads_a_quoted_printable_body() -> None:
    raw = (
        b"Subject: x\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        b"Set: shared\nKey: shared/2026-01-01T00:00:00.n.AAAAAAAAAAAAAAAA.mbox.gz\n"
        b"URL: http://127.0.0.1/bundles/shared/2026-01-01T00:00:00.n.AAAAAAAAAAAAAAAA.mb=\nox.gz\n"
    )
    notice = read_notice(raw)
    assert notice is not None and notice.fields["set"] == "shared"
    assert notice.fields["url"].endswith("AAAAAAAAAAAAAAAA.mbox.gz")
    assert read_notice(b"Subject: hi\n\njust mail\n") is None


def test_rewind() -> None:
    assert rewind("2026-01-02T00:00:30.node1.AAAAAAAAAAAAAAAA", 3600) == "2026-01-01T23:00:30"
    assert rewind(None, 3600) is None
    assert rewind("garbage", 3600) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--set", "s", "--dest", "d"],  # no source
        ["--set", "s", "--dest", "d", "--http", "http://127.0.0.1:1", "--mail", "m"],
        ["--set", "s", "--dest", "d", "--http", "http://127.0.0.1:1"],  # no token
        ["--set", "s", "--dest", "d", "--http", "ftp://127.0.0.1/", "--token", "t"],
        ["--set", "../s", "--dest", "d", "--mail", "m"],
        ["--set", "s", "--dest", "d", "--mail", "m", "--quiet", "--progress"],
        ["--set", "s", "--dest", "d", "--s3", "http://bucket/x"],
        ["--set", "s", "--dest", "d", "--mail", "m", "--unpack", "zip"],
        ["--set", "s", "--dest", "d", "--mail", "m", "--overlap", "-1"],
        ["--set", "s", "--dest", "d", "--mail", "m", "--wire"],
        ["--set", "s", "--dest", "d", "--mail", "m", "--unpack", "mbox", "--wire"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPAMTRAP_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["pull", *argv]) == 2
    assert not (tmp_path / "d").exists()


def test_pull_reads_the_manifest_a_node_stores_and_serves() -> None:
    raw = manifest(REMOTE_KEY, b"data", 1, T0)
    assert Manifest.from_json(raw).to_json_bytes() == raw  # the node's own bytes
    got = remote_manifest(raw, Remote(REMOTE_KEY, "http://127.0.0.1/x"))
    assert got == RemoteManifest(REMOTE_KEY, 4, hashlib.sha256(b"data").hexdigest())


def test_pull_tolerates_what_an_older_or_other_sender_writes() -> None:
    # Only key, size and sha256 matter to pull; upper-case hex is accepted.
    sha = hashlib.sha256(b"x").hexdigest()
    raw = json.dumps({"key": f"prefix/{REMOTE_KEY}", "size": 1, "sha256": sha.upper()}).encode()
    got = remote_manifest(raw, Remote(REMOTE_KEY, "s3-key"))
    assert got == RemoteManifest(REMOTE_KEY, 1, sha)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": -5}, "manifest field size: -5 is not a number of bytes"),
        ({"size": "4"}, "manifest field size: '4' is not a number of bytes"),
        ({"size": True}, "manifest field size: True is not a number of bytes"),
        ({"size": None}, "manifest field size: None is not a number of bytes"),
        ({"sha256": "abc"}, "manifest field sha256: 'abc' is not 64 hex digits"),
        ({"sha256": 7}, "manifest field sha256: 7 is not 64 hex digits"),
        ({"key": "shared/other.mbox.gz"}, "the manifest is for 'shared/other.mbox.gz'"),
    ],
)
def test_a_bad_remote_manifest_names_the_remote_key_and_field(
    change: dict[str, Any], message: str
) -> None:
    doc = json.loads(manifest(REMOTE_KEY, b"data", 1, T0))
    doc.update(change)
    with pytest.raises(PullError) as e:
        remote_manifest(json.dumps(doc).encode(), Remote(REMOTE_KEY, "x"))
    assert str(e.value) == f"{REMOTE_KEY}: {message}"


@given(
    raw=st.binary(max_size=300)
    | st.dictionaries(st.text(), st.integers()).map(lambda d: json.dumps(d).encode())
)
def test_any_remote_manifest_is_read_or_refused_with_its_key(raw: bytes) -> None:
    try:
        got = remote_manifest(raw, Remote(REMOTE_KEY, "x"))
    except PullError as e:
        assert REMOTE_KEY in str(e)
        return
    assert got.key == REMOTE_KEY and got.size >= 0 and len(got.sha256) == 64


class _Recorder(UrlSource):
    """A UrlSource that records the URLs it would fetch."""

    def __init__(self) -> None:
        super().__init__(timeout=1.0)
        self.urls: list[str] = []

    def get(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        self.urls.append(url)
        raise PullError("not fetched")


def test_manifest_and_index_urls_are_as_given_or_beside_the_bundle() -> None:
    base = "http://node.example/bundles/" + REMOTE_KEY
    given = Remote(
        REMOTE_KEY, base, manifest_location="http://m/x.json", index_location="http://i/x"
    )
    beside = Remote(REMOTE_KEY, base)
    source = _Recorder()
    for remote in (given, beside):
        with pytest.raises(PullError):
            source.manifest(remote)
        with pytest.raises(PullError):
            source.fetch_index(remote)
    assert source.urls == [
        "http://m/x.json",
        "http://i/x",
        base.removesuffix(".mbox.gz") + ".json",
        base.removesuffix(".mbox.gz") + ".index.jsonl",
    ]
    elsewhere = Remote(REMOTE_KEY, "http://node.example/download?id=1")
    with pytest.raises(PullError, match="no manifest URL for http://node.example/download"):
        source.manifest(elsewhere)
    with pytest.raises(PullError, match="no index URL for http://node.example/download"):
        source.fetch_index(elsewhere)
