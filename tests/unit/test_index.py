"""Bundle indexes: exact byte ranges, the manifest's sha256, the fields,
no trap address in a redacting set's index, and the reader's errors."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from spamtrap.bundle import mbox
from spamtrap.bundle.file import BundleFile
from spamtrap.bundle.index import (
    IndexFormatError,
    encode_fields,
    index_line,
    notable,
    parse_line,
    read_index,
)
from spamtrap.bundle.manifest import Manifest, ManifestError, index_name
from spamtrap.config import SetConfig
from spamtrap.filters import Keep, StageVerdict
from spamtrap.message import Envelope, iso_time
from spamtrap.metrics import Metrics
from spamtrap.store import bundle_key
from spamtrap.testing import ListWorkSource, SyncPool, config
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import Pipeline

T = 1795440675.0
KEY = bundle_key("all", T, "node1")


def envelope(n: int, data: bytes, **meta: list[str]) -> Envelope:
    return Envelope(
        msg_id=f"id{n}",
        received_at=T + n,
        mail_from=f"s{n}@sender.example",
        rcpts=["a@trap.example", "b@trap.example"],
        data=data,
        meta={
            "id": [f"id{n}"],
            "peer": ["192.0.2.7 40123"],
            "helo": ["bot.example"],
            "received": [iso_time(T + n)],
            "size": [str(len(data))],
            "dialect": ["d1"],
            **meta,
        },
    )


def write_bundle(tmp_path: Path, batches: list[list[Envelope]]) -> BundleFile:
    bundle = BundleFile(KEY, str(tmp_path / "b.mbox.gz.part"), T)
    for batch in batches:
        items = [
            (
                mbox.entry(e.mail_from, e.received_at, e.stored_bytes()),
                e.received_at,
                e.msg_id,
                encode_fields(e, len(e.rcpts)),
            )
            for e in batch
        ]
        bundle.write_many(items)
    bundle.seal()
    return bundle


def id_of(stored: bytes) -> str:
    # X-Spamtrap-Id is the first field of the metadata block.
    match = re.match(rb"X-Spamtrap-Id: (\S+)\n", stored)
    assert match is not None, stored[:200]
    return match.group(1).decode()


# Messages that try to confuse an offset: From_ lines inside, no final line
# end, CRLF, NULs, 8-bit bytes, empty bodies.
odd_bytes = st.lists(
    st.sampled_from(
        [b"From x\n", b">From y\r\n", b"\n", b"\r\n", b"\x00\xff", b"body", b"From ", b"\n\n"]
    ),
    max_size=12,
).map(lambda parts: b"Subject: s\n\n" + b"".join(parts))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(odd_bytes, min_size=1, max_size=4), min_size=1, max_size=4))
def test_each_range_is_exactly_its_entry_in_the_gunzipped_bundle(
    tmp_path: Path, batches_data: list[list[bytes]]
) -> None:
    n = iter(range(1000))
    batches = [[envelope(next(n), d) for d in batch] for batch in batches_data]
    for old in tmp_path.glob("*.part"):
        old.unlink()
    bundle = write_bundle(tmp_path, batches)
    raw = gzip.decompress(Path(bundle.part_path).read_bytes())
    entries = list(read_index(io.BytesIO(Path(bundle.index_path).read_bytes()), "x"))
    sent = [e for batch in batches for e in batch]
    assert len(entries) == len(sent)
    covered = 0
    for entry, env in zip(entries, sent, strict=True):
        assert entry.offset == covered  # contiguous: nothing between entries
        piece = raw[entry.offset : entry.offset + entry.length]
        assert piece == mbox.entry(env.mail_from, env.received_at, env.stored_bytes())
        [(head, message)] = list(mbox.MboxReader(io.BytesIO(piece)))
        assert head.startswith(b"From " + env.mail_from.encode())
        assert id_of(message) == entry.get("id") == env.msg_id
        covered += entry.length
    assert covered == len(raw)


def test_the_manifest_records_the_index_name_and_sha256(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, [[envelope(1, b"Subject: a\n\nx\n")]])
    doc = bundle.manifest_doc("all", "node1")
    index_bytes = Path(bundle.index_path).read_bytes()
    assert doc.index == KEY.split("/")[1].replace(".mbox.gz", ".index.jsonl") == index_name(KEY)
    assert doc.index_sha256 == hashlib.sha256(index_bytes).hexdigest()
    again = Manifest.from_json(doc.to_json_bytes())
    assert again == doc and again.extra == ()
    assert list(json.loads(doc.to_json_bytes()))[-2:] == ["index", "index_sha256"]


def test_manifests_without_an_index_still_load_and_bad_index_fields_are_named() -> None:
    doc = json.loads(
        Manifest(
            "all", KEY, 1, "a" * 64, 1, "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "n"
        ).to_json_bytes()
    )
    assert "index" not in doc and Manifest.from_dict(doc).index is None
    with pytest.raises(ManifestError, match="index_sha256: missing"):
        Manifest.from_dict({**doc, "index": index_name(KEY)})
    with pytest.raises(ManifestError, match="index: expected"):
        Manifest.from_dict({**doc, "index": "../../etc/passwd", "index_sha256": "b" * 64})
    with pytest.raises(ManifestError, match="index_sha256: expected 64"):
        Manifest.from_dict({**doc, "index": index_name(KEY), "index_sha256": "B" * 64})


def test_a_line_has_every_field_and_no_recipient_address() -> None:
    env = envelope(3, b"Subject: s\n\nx\n", campaign=["c0ffee"], feed=["donor1"])
    env = dataclasses.replace(env, feed="donor1")
    verdicts = [
        StageVerdict("size", "pass"),
        StageVerdict("clamd", "pass", "clamd-down"),
        StageVerdict("rfc822", "replace", "replaced"),
    ]
    line = index_line(100, 42, encode_fields(env, 2, notable(verdicts)))
    doc = json.loads(line)
    assert doc == {
        "offset": 100,
        "length": 42,
        "id": "id3",
        "received": iso_time(T + 3),
        "peer": "192.0.2.7",
        "helo": "bot.example",
        "rcpts": 2,
        "size": len(env.data),
        "feed": "donor1",
        "dialect": "d1",
        "campaign": "c0ffee",
        "reasons": [
            {"stage": "clamd", "verdict": "pass", "reason": "clamd-down"},
            {"stage": "rfc822", "verdict": "replace", "reason": "replaced"},
        ],
    }
    assert b"trap.example" not in line and line.endswith(b"}\n") and line.count(b"\n") == 1


def test_undecodable_sender_bytes_never_break_a_line() -> None:
    env = envelope(1, b"x\n", helo=["b\udcffot\u202e"])  # surrogate-escaped byte, RTL override
    doc = json.loads(index_line(0, 1, encode_fields(env, 1)))
    assert doc["helo"] == "b\udcffot\u202e"


def test_a_redacting_sets_index_has_no_trap_address(tmp_path: Path) -> None:
    cfg = config(
        traps__domains=["trap.example"],
        sets=[SetConfig("open", redact_trap_addresses=True), SetConfig("raw")],
    )

    def quoting(env: Envelope) -> Keep:
        return Keep("looked up a@trap.example")

    pipeline: Pipeline[Any] = Pipeline(
        ListWorkSource(),
        [("quote", quoting)],
        Collator(cfg.sets),
        {},
        Metrics(),
        cast(Any, Clock()),
        cast(Any, SyncPool()),
        1,
        cfg,
    )
    env = envelope(1, b"Subject: hi a@trap.example\n\nx\n", helo=["a@trap.example"])
    adds: dict[str, list[Any]] = {}
    entry = dataclasses.make_dataclass("E", [("key", tuple)])((0, 1))
    pipeline._decide(entry, env.to_record(), adds)
    [open_item] = adds["open"]
    [raw_item] = adds["raw"]
    open_fields, raw_fields = open_item[3], raw_item[3]  # (entry, time, token, fields, ...)
    assert b"trap.example" not in open_fields
    assert json.loads(b"{" + open_fields + b"}")["rcpts"] == 2
    assert b"a@trap.example" in raw_fields  # the unredacted set keeps what was sent


@pytest.mark.parametrize(
    ("lines", "number", "problem"),
    [
        ([b'{"offset":0,"length":5}\n', b"{not json\n"], 2, "not JSON"),
        ([b"[1]\n"], 1, "not a JSON object"),
        ([b'{"length":5}\n'], 1, "offset: missing"),
        ([b'{"offset":0,"length":5,"rcpts":"2"}\n'], 1, "rcpts: unexpected value"),
        ([b'{"offset":0,"length":true}\n'], 1, "length: unexpected value"),
        ([b'{"offset":-1,"length":5}\n'], 1, "not a byte range"),
        ([b'{"offset":0,"length":5}\n', b'{"offset":5,"length":5}'], 2, "truncated"),
        ([b"\xff\n"], 1, "not JSON"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(
    lines: list[bytes], number: int, problem: str
) -> None:
    with pytest.raises(IndexFormatError) as e:
        list(read_index(io.BytesIO(b"".join(lines)), "all/x.index.jsonl"))
    assert e.value.line == number
    assert str(e.value).startswith(f"all/x.index.jsonl:{number}: ")
    assert problem in str(e.value)


def test_an_entry_without_fields_is_a_range_only() -> None:
    entry = parse_line(index_line(7, 9, None)[:-1], "x", 1)
    assert (entry.offset, entry.length, entry.get("id")) == (7, 9, None)


@given(st.text(), st.text(), st.one_of(st.none(), st.text()))
def test_any_sender_text_round_trips_through_a_line(
    helo: str, dialect: str, feed: str | None
) -> None:
    env = dataclasses.replace(envelope(1, b"x\n", helo=[helo], dialect=[dialect]), feed=feed)
    reasons = [("quote", "pass", helo)]
    line = index_line(0, 1, encode_fields(env, 1, reasons))
    doc = json.loads(line)
    assert (doc["helo"], doc["dialect"], doc["feed"]) == (helo, dialect, feed)
    assert doc["reasons"] == [{"stage": "quote", "verdict": "pass", "reason": helo}]
    assert line.isascii() and line.count(b"\n") == 1
