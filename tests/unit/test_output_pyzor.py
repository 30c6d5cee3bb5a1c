"""Output ``type: pyzor`` without sockets: its config (errors with their
lines) and the output on a fake reactor: every server, retries that skip
the servers that accepted, sockets opened again, digests off the reactor,
signing, host names, close. The protocol: test_output_pyzor_wire.py; a
real pyzord: tests/integration/test_output_pyzor.py.
"""

from __future__ import annotations

import email
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pyzor
import pyzor.account
from twisted.internet import defer

from spamtrap.config import ConfigError, parse_config
from spamtrap.message import Envelope
from spamtrap.outputs import _pyzor_wire as wire
from spamtrap.outputs import kinds, settings_class
from spamtrap.outputs.base import OutputContext, OutputItem, PermanentFailure, TemporaryFailure
from spamtrap.outputs.pyzor import PyzorOutput, Settings, parse_key, split_server
from tests.support.pyzor_fakes import (
    KEY,
    NOW,
    SALT,
    SPAM,
    FakeReactor,
    FakeUDP,
    failure_of,
    result_of,
)

# -- config ---------------------------------------------------------------------

BASE = """\
traps: {catch_all: true}
sets:
  all: {}
outputs:
  report:
    type: pyzor
    sets: [all]
"""


def load(keys: str) -> Settings:
    cfg = parse_config(BASE + "".join(f"    {line}\n" for line in keys.splitlines()))
    (settings,) = cfg.outputs
    assert isinstance(settings, Settings)
    return settings


def error_of(keys: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(keys)
    return str(e.value)


def test_pyzor_is_a_kind_with_its_settings() -> None:
    assert "pyzor" in kinds()
    assert settings_class("pyzor") is Settings


def test_config_defaults_and_normal_forms() -> None:
    s = load("servers: ['127.0.0.1:24441', 'pyzor.example:24441', '[::1]:9999']")
    assert s.servers == ["127.0.0.1:24441", "pyzor.example:24441", "[::1]:9999"]
    assert (s.timeout, s.user, s.key, s.key_file) == (5.0, "anonymous", None, None)
    assert load("servers: 127.0.0.1:24441").servers == ["127.0.0.1:24441"]
    named = load(f"servers: ['127.0.0.1:24441']\nuser: bob\nkey: '{SALT},{KEY}'\ntimeout: 2s")
    assert (named.user, named.timeout) == ("bob", 2.0)


@pytest.mark.parametrize(
    ("keys", "line", "message"),
    [
        ("servers: []", 8, "outputs.report.servers: must not be empty"),
        ("servers: [nohost]", 8, "bad server address 'nohost': expected host:port"),
        ("servers: ['127.0.0.1:0']", 8, "the port must be 1-65535"),
        ("servers: ['127.0.0.1:65536']", 8, "the port must be 1-65535"),
        ("servers: ['127.0.0.1:x']", 8, "the port must be 1-65535"),
        ("servers: ['::1:24441']", 8, "put an IPv6 address in brackets"),
        ("servers: ['[nope]:24441']", 8, "'nope' is not an IPv6 address"),
        ("servers: ['1.2.3:24441']", 8, "'1.2.3' is not an IPv4 address"),
        ("servers: ['bad host:24441']", 8, "'bad host' is not a host name"),
        ("servers: [24441]", 8, "expected a server such as '127.0.0.1:24441', got an integer"),
        ("servers: ['127.0.0.1:1', '127.0.0.1:1']", 8, "127.0.0.1:1 is listed twice"),
        ("servers: ['127.0.0.1:1']\nuser: bob", 9, "user 'bob' needs its key"),
        ("servers: ['127.0.0.1:1']\nuser: 'b b'", 9, "bad Pyzor user 'b b'"),
        (f"servers: ['127.0.0.1:1']\nkey: {KEY}", 9, "the anonymous user has no key"),
        ("servers: ['127.0.0.1:1']\nuser: bob\nkey: 'not,hex'", 10, "not a Pyzor key"),
        (
            f"servers: ['127.0.0.1:1']\nuser: bob\nkey: {KEY}\nkey_file: /k",
            10,
            "give key or key_file, not both",
        ),
        ("servers: ['127.0.0.1:1']\ntimeout: 0", 9, "must be more than 0"),
        ("servers: ['127.0.0.1:1']\nserver: ['127.0.0.1:2']", 9, "did you mean 'servers'?"),
        ("user: bob", 6, "missing required key 'servers'"),
    ],
)
def test_config_errors_carry_their_line(keys: str, line: int, message: str) -> None:
    text = error_of(keys)
    assert f"<string>:{line}: " in text and message in text, text


def test_config_key_file_is_read_at_load(tmp_path: Path) -> None:
    path = tmp_path / "pyzor.key"
    path.write_text(f"{SALT},{KEY}\n")
    assert load(f"servers: ['127.0.0.1:1']\nuser: bob\nkey_file: {path}").key_file == str(path)
    path.write_text("nonsense\n")
    assert "cannot read a key from" in error_of(
        f"servers: ['127.0.0.1:1']\nuser: bob\nkey_file: {path}"
    )
    assert "No such file" in error_of(
        f"servers: ['127.0.0.1:1']\nuser: bob\nkey_file: {tmp_path / 'missing'}"
    )


def test_the_example_in_etc_is_a_valid_pyzor_output() -> None:
    text = (Path(__file__).parents[2] / "etc" / "spamtrap.yaml").read_text()
    start = text.index("\n#  pyzor-public:\n") + 1
    lines = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("#    "):
            break
        lines.append(line[1:])
    keys = [line[4:] for line in lines if not line.lstrip().startswith("#")]
    assert keys[:2] == ["type: pyzor", "sets: [all]"]  # BASE has these
    s = load("\n".join(keys[2:]))
    assert s.servers == ["public.pyzor.org:24441"] and s.user == "anonymous" and s.rate == 5


def test_split_server_and_parse_key() -> None:
    assert split_server("[2001:db8::1]:24441") == ("2001:db8::1", 24441)
    assert split_server("Public.Pyzor.org.:24441") == ("public.pyzor.org", 24441)
    assert parse_key(f"{SALT},{KEY.upper()}") == KEY
    assert parse_key(f" {KEY}\n") == KEY
    with pytest.raises(ValueError):
        parse_key("")


# -- the output ------------------------------------------------------------------------


def settings(servers: list[str], **keys: Any) -> Settings:
    return Settings(name="report", type="pyzor", sets=["all"], servers=servers, **keys)


def output(
    servers: list[str], digest: Callable[[Callable[[], Any]], Any] | None = None, **keys: Any
) -> tuple[FakeReactor, PyzorOutput]:
    reactor = FakeReactor()
    context = OutputContext(
        reactor=reactor, node="n1", data_dir="/nonexistent", relay=None,  # type: ignore[arg-type]
        hostname="trap.test",
    )  # fmt: skip

    def at_once(f: Callable[[], Any]) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f)

    return reactor, PyzorOutput("report", settings(servers, **keys), context, digest or at_once)


def item(data: bytes = SPAM, msg_id: str = "m1", set_name: str = "all") -> OutputItem:
    env = Envelope(msg_id, NOW, "bot@spam.example", ["trap@trap.example"], data)
    return OutputItem(env, set_name)


def sent_digest(port: FakeUDP, index: int = -1) -> str:
    return str(email.message_from_bytes(port.sent[index])["Op-Digest"])


def test_output_reports_the_digest_to_every_server() -> None:
    reactor, out = output(["192.0.2.1:24441", "[2001:db8::2]:9999"])
    d = out.send(item())
    a, b = reactor.ports
    assert (a.peer, a.interface) == (("192.0.2.1", 24441), "0.0.0.0")
    assert (b.peer, b.interface) == (("2001:db8::2", 9999), "::")
    assert sent_digest(a) == sent_digest(b) == wire.digest(SPAM)
    time_header = email.message_from_bytes(a.sent[0])["Time"]
    assert time_header == str(int(NOW))
    a.answer()
    assert not d.called
    b.answer()
    assert result_of(d) == wire.digest(SPAM)
    assert "192.0.2.1:24441, [2001:db8::2]:9999" in out.describe()


def test_output_reuses_its_sockets() -> None:
    reactor, out = output(["192.0.2.1:24441"])
    for n in range(3):
        d = out.send(item(msg_id=f"m{n}"))
        reactor.ports[0].answer()
        result_of(d)
    assert len(reactor.ports) == 1 and len(reactor.ports[0].sent) == 3


def test_output_retry_skips_servers_that_accepted() -> None:
    reactor, out = output(["192.0.2.1:24441", "192.0.2.2:24441"], timeout=3.0)
    d = out.send(item())
    a, b = reactor.ports
    a.answer()
    reactor.advance(3.0)  # b is silent
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "timeout"
    assert b.stopped  # a silent server gets a new socket next time
    retry = out.send(item())
    assert len(a.sent) == 1  # not asked again
    (b2,) = reactor.ports[2:]
    assert b2.peer == ("192.0.2.2", 24441)
    b2.answer()
    result_of(retry)
    # Another message goes to both again.
    out.send(item(msg_id="m2"))
    assert len(a.sent) == 2 and len(b2.sent) == 2


def test_output_reports_a_message_kept_in_two_sets_once() -> None:
    reactor, out = output(["192.0.2.1:24441"])
    d = out.send(item(set_name="all"))
    reactor.ports[0].answer()
    result_of(d)
    again = out.send(item(set_name="campaign"))  # the same message, another set
    assert result_of(again) == wire.digest(SPAM)
    assert len(reactor.ports[0].sent) == 1


def test_output_close_closes_sockets_still_draining() -> None:
    reactor, out = output(["192.0.2.1:24441"], timeout=2.0)
    slow = out.send(item(msg_id="a"))
    reactor.advance(1.0)
    late = out.send(item(msg_id="b"))
    reactor.advance(1.0)  # a times out: its socket is retired, b still waits on it
    first = reactor.ports[0]
    assert isinstance(failure_of(slow), TemporaryFailure) and not first.stopped
    assert not late.called
    out.close()
    assert first.stopped
    e = failure_of(late)
    assert isinstance(e, TemporaryFailure) and e.reason == "stopped"


def test_output_permanent_failure_once_nothing_is_left_to_retry() -> None:
    reactor, out = output(["192.0.2.1:24441", "192.0.2.2:24441"])
    d = out.send(item())
    a, b = reactor.ports
    a.answer(400, "Bad request: no digest")
    b.answer(500, "Internal Server Error")
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "server-error"  # b may recover
    d = out.send(item())
    assert len(a.sent) == 2  # a refused it, so it was not done: asked again
    a.answer(400, "Bad request: no digest")
    b.answer()
    e = failure_of(d)
    assert isinstance(e, PermanentFailure) and e.reason == "bad-request"


def test_output_refused_then_a_new_socket() -> None:
    reactor, out = output(["192.0.2.1:24441"])
    d = out.send(item())
    (a,) = reactor.ports
    a.protocol.connectionRefused()
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "refused" and a.stopped
    d = out.send(item())
    (b,) = reactor.ports[1:]
    b.answer()
    result_of(d)


def test_output_message_pyzor_cannot_digest_is_permanent() -> None:
    # Pyzor's digester fails on HTML that html.parser refuses; pyzor check
    # would fail the same way, so retrying is useless.
    html = b"Content-Type: text/html\r\n\r\n<html><![foo bar]><p>some text here</p></html>\r\n"
    reactor, out = output(["192.0.2.1:24441"])
    e = failure_of(out.send(item(html)))
    assert isinstance(e, PermanentFailure) and e.reason == "digest"
    assert not reactor.ports  # nothing was sent


def test_output_digests_through_its_runner() -> None:
    calls: list[Callable[[], Any]] = []
    waiting: defer.Deferred[Any] = defer.Deferred()

    def later(f: Callable[[], Any]) -> defer.Deferred[Any]:
        calls.append(f)
        return waiting

    reactor, out = output(["192.0.2.1:24441"], digest=later)
    d = out.send(item())
    assert len(calls) == 1 and not reactor.ports  # nothing sent before the digest is in
    waiting.callback(calls[0]())
    reactor.ports[0].answer()
    assert result_of(d) == wire.digest(SPAM)


def test_output_signs_for_its_account(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"{SALT},{KEY}\n")
    reactor, out = output(["192.0.2.1:24441"], user="bob", key_file=str(path))
    path.unlink()  # read once, at the first send... which is below: gone
    e = failure_of(out.send(item()))
    assert isinstance(e, TemporaryFailure) and e.reason == "key-file"
    path.write_text(f"{KEY}\n")
    d = out.send(item())
    (port,) = reactor.ports
    msg = email.message_from_bytes(port.sent[0])
    assert msg["User"] == "bob"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pyzor.account.time, "time", lambda: NOW)
        pyzor.account.verify_signature(msg, KEY)
    port.answer()
    result_of(d)


def test_output_resolves_host_names_and_reports_dns_failures() -> None:
    reactor, out = output(["pyzor.example:24441"])
    e = failure_of(out.send(item()))
    assert isinstance(e, TemporaryFailure) and e.reason == "dns"
    reactor.names["pyzor.example"] = "192.0.2.9"
    d = out.send(item())
    assert reactor.ports[0].peer == ("192.0.2.9", 24441)
    reactor.ports[0].answer()
    result_of(d)


def test_output_close_lets_go_and_refuses_new_sends() -> None:
    reactor, out = output(["192.0.2.1:24441"])
    d = out.send(item())
    (port,) = reactor.ports
    assert out.close() is None
    assert port.stopped
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "stopped"
    e = failure_of(out.send(item(msg_id="m2")))
    assert isinstance(e, TemporaryFailure) and e.reason == "stopped"
    assert not reactor.getDelayedCalls()


def test_output_remembers_a_bounded_number_of_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from spamtrap.outputs import pyzor as kind

    monkeypatch.setattr(kind, "_DONE_KEPT", 3)
    reactor, out = output(["192.0.2.1:24441", "192.0.2.2:24441"], timeout=1.0)
    for n in range(5):
        d = out.send(item(msg_id=f"m{n}"))
        reactor.ports[0].answer()
        reactor.advance(1.0)
        failure_of(d)
    assert list(out._done) == ["m2", "m3", "m4"]
