"""``spamtrap explain``: the daemon's decision for message files, as text and JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from spamtrap.cli import explain
from spamtrap.cli.main import main
from spamtrap.filters import registry

ROOT = Path(__file__).parents[2]

SPAM = (
    b"Return-Path: <winner@bot.example>\r\n"
    b"From: Winner <winner@bot.example>\r\n"
    b"To: Victim <victim@trap.example>, other@trap2.example\r\n"
    b"Subject: You won\r\n"
    b"\r\n"
    b"Claim it.\r\n"
)


def forward_with_two_attachments() -> bytes:
    parts = [
        b"Content-Type: text/plain\r\n\r\nsee attached\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: first\r\n\r\none\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: second\r\n\r\ntwo\r\n",
    ]
    return (
        b"Delivered-To: donor@donor.example\r\n"
        b"From: donor@donor.example\r\nTo: feed@feed.example\r\nSubject: Fwd\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"".join(b"--b\r\n" + p for p in parts)
        + b"--b--\r\n"
    )


CONFIG = """\
traps: {catch_all: true}
feeds:
  - {id: donor, address: feed@feed.example, extract_attached: true}
filters:
  max_size: 2KiB
  order: [size, feeds]
sets:
  all: {}
  second:
    match: [{header: Subject, regex: second}]
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {
        "spam": tmp_path / "spam.eml",
        "large": tmp_path / "large.eml",
        "forward": tmp_path / "forward.eml",
        "config": tmp_path / "spamtrap.yaml",
    }
    paths["spam"].write_bytes(SPAM)
    paths["large"].write_bytes(SPAM + b"x" * 5000 + b"\r\n")
    paths["forward"].write_bytes(forward_with_two_attachments())
    paths["config"].write_text(CONFIG)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(autouse=True)
def feeds_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Until the registry lists the feeds stage (see the report), add it here.
    monkeypatch.setitem(registry.BUILTIN_MODULES, "feeds", "spamtrap.filters.feeds")


async def cli(*argv: str) -> int:
    """``spamtrap`` in-process. The test session's reactor already runs (it
    can run only once per process), so the command runs in a thread and
    puts its reactor part on that reactor; the real program, which goes
    through task.react, is run in tests/system/test_cli.py."""
    code: int = await deferToThread(main, list(argv))
    return code


async def run_json(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any], str]:
    code = await cli("explain", "--json", *argv)
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest_twisted.ensureDeferred
async def test_plain_spam_is_kept_in_all(files: dict[str, str], capsys: Any) -> None:
    assert await cli("explain", files["spam"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"{files['spam']}: keep, sets: all"
    # Then one line per stage of the default config (which ones depends on
    # the registry), each "name  verdict  reason", aligned.
    assert re.fullmatch(r"  size +pass", lines[1])
    assert all(line.startswith("  ") for line in lines[1:])
    assert err == ""


@pytest_twisted.ensureDeferred
async def test_too_large_is_discarded_by_size(files: dict[str, str], capsys: Any) -> None:
    code, doc, _ = await run_json(capsys, "--config", files["config"], files["large"])
    assert code == 0
    (msg,) = doc["messages"]
    assert (msg["verdict"], msg["stage"], msg["reason"], msg["sets"]) == (
        "discard",
        "size",
        "too-large",
        [],
    )
    assert [(s["stage"], s["verdict"]) for s in msg["stages"]] == [("size", "discard")]


@pytest_twisted.ensureDeferred
async def test_feed_wrapper_lists_its_extracted_messages(
    files: dict[str, str], capsys: Any
) -> None:
    code, doc, _ = await run_json(
        capsys, "--config", files["config"], "--feed", "donor", files["forward"]
    )
    assert code == 0
    (msg,) = doc["messages"]
    assert msg["verdict"] == "keep"
    assert msg["stages"][1]["stage"] == "feeds"
    assert msg["stages"][1]["verdict"] == "replace"
    assert msg["stages"][1]["reason"] == "rfc822:2"
    assert msg["sets"] == ["all", "second"]  # union over what it became
    assert [(x["id"], x["verdict"], x["sets"]) for x in msg["extracted"]] == [
        ("explain-1-1", "keep", ["all"]),
        ("explain-1-2", "keep", ["all", "second"]),
    ]
    assert msg["extracted"][0]["meta"] == {"x_extracted_from": ["explain-1"]}
    # Text output shows the same.
    assert (
        await cli("explain", "--config", files["config"], "--feed", "donor", files["forward"]) == 0
    )
    out = capsys.readouterr().out
    assert "  extracted explain-1-2: keep, sets: all, second" in out.splitlines()


@pytest_twisted.ensureDeferred
async def test_json_shape_and_types(files: dict[str, str], capsys: Any) -> None:
    code, doc, _ = await run_json(
        capsys,
        "--config",
        files["config"],
        "--rcpt",
        "r@trap.example",
        files["spam"],
        files["large"],
    )
    assert code == 0
    assert doc["format"] == 1
    assert "errors" not in doc
    assert [m["file"] for m in doc["messages"]] == [files["spam"], files["large"]]
    keys = {"file", "id", "verdict", "stage", "reason", "stages", "sets", "extracted", "meta"}
    for m in doc["messages"]:
        assert set(m) == keys
        assert m["verdict"] in ("keep", "discard")
        assert isinstance(m["stage"], str | None) and isinstance(m["reason"], str | None)
        assert all(isinstance(s, str) for s in m["sets"])
        for s in m["stages"]:
            assert set(s) == {"stage", "verdict", "reason", "seconds"}
            assert isinstance(s["seconds"], float)
    kept = doc["messages"][0]
    assert (kept["stage"], kept["reason"]) == (None, None)


@pytest_twisted.ensureDeferred
async def test_unreadable_file_exits_1_and_the_others_are_explained(
    files: dict[str, str], tmp_path: Path, capsys: Any
) -> None:
    missing = str(tmp_path / "missing.eml")
    code, doc, err = await run_json(capsys, missing, files["spam"])
    assert code == 1
    assert f"{missing}: cannot read: No such file or directory" in err
    assert doc["errors"] == [{"file": missing, "error": "cannot read: No such file or directory"}]
    assert [m["file"] for m in doc["messages"]] == [files["spam"]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--feed", "nosuch"], "--feed nosuch: not a configured feed"),
        (["--meta", "helo"], "--meta helo: expected NAME=VALUE"),
        (["--meta", "colour=red"], "unknown metadata field 'colour'"),
    ],
)
def test_usage_errors_exit_2(
    files: dict[str, str], capsys: Any, argv: list[str], message: str
) -> None:
    assert main(["explain", *argv, files["spam"]]) == 2
    assert message in capsys.readouterr().err


def test_no_files_and_bad_config_exit_2(files: dict[str, str], tmp_path: Path, capsys: Any) -> None:
    assert main(["explain"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("traps: {catch_all: true}\nfilters: {max_sise: 1}\n")
    assert main(["explain", "--config", str(bad), files["spam"]]) == 2
    assert f"{bad}:2: filters.max_sise: unknown key" in capsys.readouterr().err


def test_envelope_from_a_file() -> None:
    data = b"From someone@example Tue Mar  3 10:00:00 2026\n" + SPAM
    opts = explain.Options(rcpts=[], feed=None, meta=[("helo", "[192.0.2.1]")])
    env = explain.envelope_from_bytes(data, "e1", opts, 0.0)
    assert env.data == SPAM  # the mbox From_ line is not part of the message
    assert env.mail_from == "winner@bot.example"
    assert env.rcpts == ["victim@trap.example", "other@trap2.example"]
    assert env.meta["rcpt"] == ["<victim@trap.example>", "<other@trap2.example>"]
    assert env.meta["domain"] == ["trap.example", "trap2.example"]
    assert env.meta["helo"] == ["[192.0.2.1]"]
    assert env.meta["size"] == [str(len(SPAM))]
    env = explain.envelope_from_bytes(b"Subject: x\r\n\r\n", "e2", explain.Options([], None, []), 0)
    assert (env.mail_from, env.rcpts) == ("", [])


@pytest_twisted.ensureDeferred
async def test_meta_option_feeds_set_rules(
    tmp_path: Path, files: dict[str, str], capsys: Any
) -> None:
    cfg = tmp_path / "helo.yaml"
    cfg.write_text(
        "traps: {catch_all: true}\n"
        "sets: {all: {}, literal: {match: [{meta: helo, regex: '^\\['}]}}\n"
    )
    code, doc, _ = await run_json(
        capsys, "--config", str(cfg), "--meta", "helo=[192.0.2.1]", files["spam"]
    )
    assert code == 0
    assert doc["messages"][0]["sets"] == ["all", "literal"]


# -- --feed: the header block after the feed's stripping ---------------------------

BY_HOST_CONFIG = """\
traps: {catch_all: true}
feeds:
  - id: pf
    address: pf@feed.example
    strip_received_by: [mx.donor.example]
  - id: att
    address: att@feed.example
    extract_attached: true
    strip_received_by: [mx.donor.example]
"""

POSTFIX_ALIAS_FORWARD = (
    b"Received: by mx.donor.example (Postfix)\r\n\tid 4F1; Tue, 3 Mar 2026 10:00:02 +0000\r\n"
    b"Received: from bot.example (unknown [203.0.113.9])\r\n"
    b"\tby mx.donor.example (Postfix) with ESMTP id 9A2\r\n"
    b"Delivered-To: trap7@donor.example\r\n"
    b"X-Evil: \x1b[2Jcleared\r\n"
    b"From: prize@bot.example\r\nSubject: You won\r\n\r\nbody\r\n"
)


@pytest.fixture
def by_host(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "byhost.yaml"
    cfg.write_text(BY_HOST_CONFIG)
    msg = tmp_path / "alias.eml"
    msg.write_bytes(POSTFIX_ALIAS_FORWARD)
    wrapper = tmp_path / "wrapper.eml"
    wrapper.write_bytes(forward_with_two_attachments())
    return {"config": str(cfg), "msg": str(msg), "wrapper": str(wrapper)}


@pytest_twisted.ensureDeferred
async def test_feed_shows_the_header_block_with_removed_fields_marked(
    by_host: dict[str, str], capsys: Any
) -> None:
    code, doc, _ = await run_json(
        capsys, "--config", by_host["config"], "--feed", "pf", by_host["msg"]
    )
    assert code == 0
    (msg,) = doc["messages"]
    assert msg["feed"] == "pf"
    assert [(f["name"], f["stripped"]) for f in msg["header"]] == [
        ("Received", "strip_received_by"),
        ("Received", None),
        ("Delivered-To", "strip_headers"),
        ("X-Evil", None),
        ("From", None),
        ("Subject", None),
    ]
    # The texts are the fields as they came, so kept ones rebuild the block.
    assert msg["header"][1]["text"] == (
        "Received: from bot.example (unknown [203.0.113.9])\r\n"
        "\tby mx.donor.example (Postfix) with ESMTP id 9A2"
    )
    assert msg["meta"]["x_stripped"] == ["Received=1, Delivered-To=1"]

    assert await cli("explain", "--config", by_host["config"], "--feed", "pf", by_host["msg"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("  header after feed pf ('-' removed):")
    assert out[start + 1 :] == [
        "  - Received: by mx.donor.example (Postfix)  [strip_received_by]",
        "  - \tid 4F1; Tue, 3 Mar 2026 10:00:02 +0000",
        "    Received: from bot.example (unknown [203.0.113.9])",
        "    \tby mx.donor.example (Postfix) with ESMTP id 9A2",
        "  - Delivered-To: trap7@donor.example  [strip_headers]",
        "    X-Evil: \\x1b[2Jcleared",  # no terminal escapes from spam
        "    From: prize@bot.example",
        "    Subject: You won",
    ]


@pytest_twisted.ensureDeferred
async def test_feed_header_of_extracted_messages_and_not_of_the_wrapper(
    by_host: dict[str, str], capsys: Any
) -> None:
    code, doc, _ = await run_json(
        capsys, "--config", by_host["config"], "--feed", "att", by_host["wrapper"]
    )
    assert code == 0
    (msg,) = doc["messages"]
    assert msg["header"] is None  # replaced by what it carried: not stored
    assert [x["header"] for x in msg["extracted"]] == [
        [{"name": "Subject", "text": "Subject: first", "stripped": None}],
        [{"name": "Subject", "text": "Subject: second", "stripped": None}],
    ]


@pytest_twisted.ensureDeferred
async def test_no_header_without_feed(by_host: dict[str, str], capsys: Any) -> None:
    code, doc, _ = await run_json(capsys, "--config", by_host["config"], by_host["msg"])
    assert code == 0
    assert "header" not in doc["messages"][0] and "feed" not in doc["messages"][0]


def test_unknown_feed_id_is_an_error_naming_the_feeds(by_host: dict[str, str], capsys: Any) -> None:
    assert main(["explain", "--config", by_host["config"], "--feed", "pg", by_host["msg"]]) == 2
    err = capsys.readouterr().err
    assert err == "spamtrap explain: --feed pg: not a configured feed (feeds: pf, att)\n"
