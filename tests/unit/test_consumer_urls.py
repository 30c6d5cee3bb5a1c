"""``http.public_url`` must be a base URL that consumers can follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from spamtrap.config import ConfigError, load_config


@pytest.mark.parametrize(
    "value, problem",
    [
        ("ftp://traps.example.org", "expected an http:// or https:// URL"),
        ("traps.example.org:8025", "expected an http:// or https:// URL"),
        ("http://traps.example.org/?token=x", "takes no query or fragment"),
        ("http://traps.example.org/#top", "takes no query or fragment"),
        ("http://traps.example.org:99999", "bad port"),
        ("'http://traps.example.org/a b'", "no spaces"),
    ],
)
def test_public_url_must_be_a_base_url(tmp_path: Path, value: str, problem: str) -> None:
    for section in ("http", "store"):
        path = tmp_path / f"{section}.yaml"
        path.write_text(f"traps:\n  catch_all: true\n{section}:\n  public_url: {value}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(path))
        assert f"{section}.yaml:4" in str(e.value)
        assert f"{section}.public_url" in str(e.value) and problem in str(e.value)


def test_a_good_public_url_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("traps:\n  catch_all: true\nhttp:\n  public_url: https://t.example/st/\n")
    assert load_config(str(path)).http.public_url == "https://t.example/st/"
