"""Index files for the tests of ``spamtrap stats``: a message's index
fields, index files (and their manifests) under a store root, and the
command run over them with its output captured."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from spamtrap.bundle.index import encode_fields, index_line
from spamtrap.cli.main import build_parser
from spamtrap.cli.stats import run
from spamtrap.message import Envelope, iso_time
from spamtrap.store import bundle_key, index_key, manifest_key

T = 1795440675.0  # 2026-11-23T13:31:15Z


def message(t: float, campaign: str | None, helo: str, peer: str, dialect: str = "d1") -> bytes:
    meta = {
        "peer": [f"{peer} 4000"],
        "helo": [helo],
        "dialect": [dialect],
        "received": [iso_time(t)],
    }
    if campaign is not None:
        meta["campaign"] = [campaign]
    env = Envelope("id", t, "s@x", ["a@trap.example"], b"x\n", meta=meta)
    return encode_fields(env, 1)


def write_index(
    root: Path, set_name: str, opened: float, lines: list[bytes], **manifest: Any
) -> Path:
    key = bundle_key(set_name, opened, "node1")
    path = root / index_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    offset = 0
    out = []
    for fields in lines:
        out.append(index_line(offset, 50, fields) if not fields.startswith(b"!") else fields[1:])
        offset += 50
    path.write_bytes(b"".join(out))
    if manifest:
        (root / manifest_key(key)).write_text(json.dumps(manifest))
    return path


def stats(*argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["stats", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = run(args, out, err)
    return code, out.getvalue(), err.getvalue()
