"""The typed Manifest: the bytes on disk and on the wire are those spamtrap
has always written, every format-1 manifest reads back, and a bad one is an
error naming the bundle key and the field."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamtrap.bundle.file import BundleFile, manifest_bytes
from spamtrap.bundle.manifest import FIELDS, Manifest, ManifestError
from spamtrap.store import NAME_PATTERN, bundle_key

# A manifest as spamtrap wrote it before the Manifest type (format 1).
WRITTEN_BEFORE = (
    b'{"format": 1, "set": "all", "key": "all/2026-11-22T13:31:15.node1.JHYEFNEVQxl6R6sZ.mbox.gz", '
    b'"size": 4242, "sha256": "' + b"ab" * 32 + b'", "messages": 3, '
    b'"first_received": "2026-11-22T13:31:15Z", "last_received": "2026-11-22T13:31:25Z", '
    b'"node": "node1"}\n'
)


def old_manifest_bytes(bundle: BundleFile, set_name: str, node: str) -> bytes:
    """What bundle_file wrote before this type existed, verbatim."""

    def iso_utc(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    doc = {
        "format": 1,
        "set": set_name,
        "key": bundle.key,
        "size": bundle.size,
        "sha256": bundle.sha256.hexdigest(),
        "messages": bundle.messages,
        "first_received": iso_utc(bundle.first_received),
        "last_received": iso_utc(bundle.last_received),
        "node": node,
    }
    return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")


def test_a_bundle_gets_the_same_manifest_bytes_as_before(tmp_path: Path) -> None:
    key = bundle_key("all", 1795440675.0, "node1")
    bundle = BundleFile(key, str(tmp_path / "b.part"), 1795440675.0)
    bundle.write(b"From a\nSubject: x\n\nbody\n\n", 1795440683.25, "t1")
    bundle.write(b"From b\nSubject: y\n\nbody\n\n", 1795440681.0, "t2")
    bundle.seal()
    manifest = bundle.manifest_doc("all", "node1")
    # The format-1 fields are the bytes of old; the index's two follow them.
    without_index = dataclasses.replace(manifest, index=None, index_sha256=None)
    assert manifest_bytes(without_index) == old_manifest_bytes(bundle, "all", "node1")
    assert manifest.index == key.split("/")[1].replace(".mbox.gz", ".index.jsonl")
    assert manifest.to_json_bytes().startswith(old_manifest_bytes(bundle, "all", "node1")[:-2])
    assert manifest.first_received == "2026-11-23T13:31:21Z"  # the earliest, not the first
    assert Manifest.from_json(manifest.to_json_bytes()) == manifest


def test_a_manifest_written_before_reads_back_to_the_same_bytes() -> None:
    manifest = Manifest.from_json(WRITTEN_BEFORE)
    assert manifest.key == "all/2026-11-22T13:31:15.node1.JHYEFNEVQxl6R6sZ.mbox.gz"
    assert (manifest.size, manifest.messages, manifest.format) == (4242, 3, 1)
    assert manifest.extra == ()
    assert manifest.to_json_bytes() == WRITTEN_BEFORE
    assert list(manifest.to_dict()) == list(FIELDS)


def test_keys_added_by_others_are_kept_in_order() -> None:
    doc = json.loads(WRITTEN_BEFORE)
    doc["note"] = "résumé"
    doc["tags"] = ["a", {"b": None}]
    raw = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
    manifest = Manifest.from_json(raw)
    assert manifest.extra == (("note", "résumé"), ("tags", ["a", {"b": None}]))
    assert manifest.to_json_bytes() == raw


def test_a_manifest_is_frozen() -> None:
    manifest = Manifest.from_json(WRITTEN_BEFORE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.size = 1  # type: ignore[misc]


KEY = "all/2026-11-22T13:31:15.node1.JHYEFNEVQxl6R6sZ.mbox.gz"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("format", 2, "2 is not known"),
        ("format", "1", 'expected a number, got "1"'),
        ("format", True, "expected a number, got true"),
        ("set", "", 'expected a non-empty string, got ""'),
        ("node", 7, "expected a non-empty string, got 7"),
        ("size", -1, "expected a whole number >= 0, got -1"),
        ("size", 1.5, "expected a whole number >= 0, got 1.5"),
        ("messages", None, "expected a whole number >= 0, got null"),
        ("sha256", "AB" * 32, "expected 64 lower-case hex digits"),
        ("sha256", "ab", "expected 64 lower-case hex digits"),
        ("first_received", 1767322800.0, "expected a UTC time"),
        ("last_received", "2026-11-22 13:31:25", "expected a UTC time"),
        ("first_received", "2026-11-23T00:00:00Z", "later than last_received"),
    ],
)
def test_a_bad_field_is_named_with_the_key(field: str, value: Any, problem: str) -> None:
    doc = json.loads(WRITTEN_BEFORE)
    doc[field] = value
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(json.dumps(doc), "manifest s3://b/p/all/x.json")
    assert str(e.value).startswith(f"manifest s3://b/p/all/x.json of {KEY}: {field}: ")
    assert problem in str(e.value)
    assert (e.value.key, e.value.field) == (KEY, field)


@pytest.mark.parametrize("field", FIELDS)
def test_a_missing_field_is_named(field: str) -> None:
    doc = json.loads(WRITTEN_BEFORE)
    del doc[field]
    with pytest.raises(ManifestError, match=f": {field}: missing$") as e:
        Manifest.from_dict(doc)
    assert e.value.key == (None if field == "key" else KEY)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "manifest: not JSON"),
        (b"\xff\xfe", "manifest: not JSON"),
        (b"[1, 2]", "manifest: expected a JSON object, got [1, 2]"),
        (b'"x"', 'manifest: expected a JSON object, got "x"'),
    ],
)
def test_a_document_that_is_no_object_is_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(ManifestError, match="^" + problem.replace("[", r"\[")) as e:
        Manifest.from_json(raw)
    assert e.value.key is None and e.value.field is None


# -- properties ----------------------------------------------------------------------

set_names = st.from_regex(f"\\A{NAME_PATTERN}\\Z", fullmatch=True).filter(lambda s: len(s) < 40)
utc_times = st.integers(0, 4102444799).map(
    lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    first, last = sorted((draw(utc_times), draw(utc_times)))
    extra_names = draw(st.lists(st.text().filter(lambda k: k not in FIELDS), unique=True))
    return Manifest(
        set=draw(set_names),
        key=draw(st.text(min_size=1)),
        size=draw(st.integers(0, 2**63)),
        sha256=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
        messages=draw(st.integers(0, 10**9)),
        first_received=first,
        last_received=last,
        node=draw(st.text(min_size=1)),
        extra=tuple((k, draw(json_values)) for k in extra_names),
    )


@given(manifest=manifests())
def test_every_valid_manifest_round_trips_byte_for_byte(manifest: Manifest) -> None:
    raw = manifest.to_json_bytes()
    assert raw == (json.dumps(manifest.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
    assert Manifest.from_json(raw) == manifest
    assert Manifest.from_json(raw).to_json_bytes() == raw


@given(doc=st.dictionaries(st.sampled_from(FIELDS) | st.text(), json_values, max_size=12))
def test_any_json_object_is_a_manifest_or_a_manifest_error(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as e:
        assert e.field is None or e.field in FIELDS
        return
    assert manifest.to_dict() == doc


@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_manifest_or_a_manifest_error(raw: bytes) -> None:
    try:
        Manifest.from_json(raw)
    except ManifestError:
        pass
