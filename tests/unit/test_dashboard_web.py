"""``/dashboard`` and ``/dashboard/data.json`` over HTTP, in memory.

The resource tree is web.make_root's, with the dashboard mounted as the
service mounts it, driven by treq's ``StubTreq`` (real requests and
responses, no socket), as tests/unit/test_web.py does. The page's own
behaviour in a browser is tests/system/test_dashboard.py's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import task

from spamtrap import testing
from spamtrap.config import ConfigError, SetConfig, parse_config
from spamtrap.dashboard import Dashboard, make_dashboard_resource
from spamtrap.dashboard.resource import PAGE
from spamtrap.metrics import Metrics
from spamtrap.service.compose import SpamtrapService
from spamtrap.testing import MemoryStore
from spamtrap.web import make_root
from spamtrap.work.spool import SpoolIntake

BASE = "http://spamtrap.test"
DASH_TOKEN = "dash-0123456789abcdef"


def stub(mode: str = "open", token: str | None = None) -> tuple[StubTreq, Metrics]:
    cfg = testing.config(
        traps__catch_all=True,
        sets=[SetConfig(name="all"), SetConfig(name="hidden", private=True, token="tok-h")],
        http__dashboard=mode,
        http__dashboard_token=token,
    )
    metrics = Metrics()
    board = Dashboard(cfg, metrics, task.Clock(), web_served=True)
    page = make_dashboard_resource(board, mode, token)
    return StubTreq(make_root(MemoryStore(), cfg, metrics, dict, page)), metrics


async def get(client: StubTreq, path: str, **kw: Any) -> tuple[int, Any, bytes]:
    response = await client.get(BASE + path, **kw)
    return response.code, response.headers, await client.content(response)


def header(headers: Any, name: str) -> str:
    values = headers.getRawHeaders(name)
    assert values, f"no {name} header"
    return str(values[0])


@pytest_twisted.ensureDeferred
async def test_open_serves_the_page_and_its_figures() -> None:
    client, metrics = stub()
    metrics.messages_accepted.inc(41)
    for path in ("/dashboard", "/dashboard/"):
        code, headers, body = await get(client, path)
        assert code == 200
        assert header(headers, "content-type") == "text/html; charset=utf-8"
        assert header(headers, "cache-control") == "no-store"
        assert body == PAGE
    code, headers, body = await get(client, "/dashboard/data.json")
    assert code == 200 and header(headers, "content-type") == "application/json"
    doc = json.loads(body)
    assert doc["figures"]["messages_accepted"] == 41
    assert [s["name"] for s in doc["sets"]] == ["all"]
    assert b"hidden" not in body and b"tok-h" not in body


@pytest_twisted.ensureDeferred
async def test_token_mode_takes_a_bearer_header_or_a_query_token() -> None:
    client, _ = stub("token", DASH_TOKEN)
    # The page is code only: served without the token, so a reload works
    # once the script has taken the token out of the address bar.
    code, _, body = await get(client, "/dashboard")
    assert (code, body) == (200, PAGE)
    data = "/dashboard/data.json"
    code, headers, body = await get(client, data)
    assert code == 401
    assert header(headers, "www-authenticate").startswith("Bearer")
    assert DASH_TOKEN.encode() not in body
    assert (await get(client, data + "?token=wrong-" + DASH_TOKEN))[0] == 401
    assert (await get(client, data + "?token="))[0] == 401
    assert (await get(client, data, headers={"Authorization": "Bearer nope"}))[0] == 401
    # A wrong Bearer header is not rescued by a right ?token=.
    wrong = {"Authorization": "Bearer nope"}
    assert (await get(client, f"{data}?token={DASH_TOKEN}", headers=wrong))[0] == 401
    right = {"Authorization": f"Bearer {DASH_TOKEN}"}
    code, _, body = await get(client, data, headers=right)
    assert code == 200 and json.loads(body)["figures"]["messages_accepted"] == 0
    assert (await get(client, f"{data}?token={DASH_TOKEN}"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_token_mode_without_a_token_refuses_everyone() -> None:
    client, _ = stub("token", None)
    code, _, body = await get(client, "/dashboard/data.json?token=")
    assert code == 403 and b"http.dashboard_token" in body
    code, _, _ = await get(client, "/dashboard/data.json", headers={"Authorization": "Bearer "})
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_off_mounts_nothing() -> None:
    assert make_dashboard_resource(None, "off", None) is None  # type: ignore[arg-type]
    client, _ = stub("off")
    for path in ("/dashboard", "/dashboard/data.json"):
        code, _, body = await get(client, path)
        assert (code, body) == (404, b"not found\n")


@pytest_twisted.ensureDeferred
async def test_only_get_and_head_and_only_known_paths() -> None:
    client, _ = stub()
    response = await client.post(BASE + "/dashboard/data.json", data=b"x")
    assert response.code == 405
    assert header(response.headers, "allow") == "GET, HEAD"
    response = await client.head(BASE + "/dashboard")
    assert response.code == 200 and await client.content(response) == b""
    for path in ("/dashboard/nope", "/dashboard/data.json/x", "/dashboard//", "/dashboard/x/"):
        code, _, _ = await get(client, path)
        assert code == 404, path


def test_a_mode_the_resource_cannot_serve_is_refused() -> None:
    board = Dashboard(testing.config(), Metrics(), task.Clock(), web_served=True)
    with pytest.raises(ValueError, match="open or token"):
        make_dashboard_resource(board, "public", None)


class _Refs(HTMLParser):
    """Every URL the page could make a browser fetch, and its inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action", "data", "poster", "srcset") and value:
                self.urls.append(value)
        self._in = tag if tag in ("script", "style") else None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in = None


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest_twisted.ensureDeferred
async def test_the_page_is_self_contained_and_its_policy_allows_only_itself() -> None:
    client, _ = stub()
    _, headers, body = await get(client, "/dashboard")
    refs = _Refs()
    refs.feed(body.decode())
    # Nothing to fetch but an empty data: icon (no favicon request either).
    assert refs.urls == ["data:,"]
    script, style = "".join(refs.scripts), "".join(refs.styles)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script + style)
    assert "@import" not in style and "url(" not in style
    csp = header(headers, "content-security-policy")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert f"script-src {_sha(script)};" in csp
    assert f"style-src {_sha(style)};" in csp
    assert header(headers, "referrer-policy") == "no-referrer"


def test_the_script_never_parses_data_as_html() -> None:
    refs = _Refs()
    refs.feed(PAGE.decode())
    script = "".join(refs.scripts)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "textContent" in script
    # Links only to http(s): a store URL never becomes javascript: or data:.
    assert "/^https?:\\/\\//i.test(url)" in script


def test_every_figure_of_the_document_has_an_element() -> None:
    board = Dashboard(testing.config(), Metrics(), task.Clock(), web_served=True)
    doc = board.build(0.0)
    page = PAGE.decode()
    for name in doc["figures"]:
        assert f'data-metric="{name}"' in page, name
    for name in ("intake_per_minute", "top_helo", "top_dialect", "top_peer", "top_campaign"):
        assert f'data-metric="{name}"' in page, name


def test_http_dashboard_config() -> None:
    base = "traps: {catch_all: true}\nhttp:\n"
    assert parse_config(base).http.dashboard == "open"
    # YAML reads a bare off as false: it still means off.
    assert parse_config(base + "  dashboard: off\n").http.dashboard == "off"
    cfg = parse_config(base + f"  dashboard: token\n  dashboard_token: {DASH_TOKEN}\n")
    assert (cfg.http.dashboard, cfg.http.dashboard_token) == ("token", DASH_TOKEN)
    with pytest.raises(ConfigError) as e:
        parse_config(base + "  dashboard: tokn\n", "t.yaml")
    assert "t.yaml:3: http.dashboard: unknown value 'tokn'; did you mean 'token'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(base + "  dashboard: true\n", "t.yaml")
    assert "t.yaml:3: http.dashboard" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(base + "  dashboard_token: ''\n", "t.yaml")
    assert "t.yaml:3: http.dashboard_token" in str(e.value)


@pytest.mark.parametrize("mode", ["open", "token", "off"])
def test_the_service_wires_the_dashboard_as_configured(mode: str, tmp_path: Path) -> None:
    # Built, never started: no socket, no thread, no file.
    cfg = testing.config(
        traps__catch_all=True,
        sets=[SetConfig(name="all")],
        data_dir=str(tmp_path / "data"),
        http__dashboard=mode,
    )
    svc = SpamtrapService(cfg, task.Clock())
    mounted = b"dashboard" in svc.site.resource.children
    if mode == "off":
        assert svc.dashboard is None and not mounted
        assert svc.pipeline.on_processed is None  # no hook runs at all
        assert isinstance(svc.intake, SpoolIntake)
        return
    board = svc.dashboard
    assert board is not None and mounted
    assert svc.pipeline.on_processed == board.processed
    # The SMTP factory submits through the counting intake, around the spool.
    assert not isinstance(svc.intake, SpoolIntake)
    assert svc.smtp_factory.submit == svc.intake.submit
    assert not (tmp_path / "data").exists()
