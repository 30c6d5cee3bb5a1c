"""Connection slots shared fairly: the per-IP limit (counted on the original
client behind a trusted balancer) and the idle cap before the first MAIL."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import address, defer, task
from twisted.internet.testing import StringTransport

from spamtrap import testing
from spamtrap.config import Config, ConfigError, SetConfig, load_config
from spamtrap.intake import proxy
from spamtrap.intake.smtp import TrapSMTP, TrapSMTPFactory, client_key
from spamtrap.metrics import Metrics


def _config(**smtp: Any) -> Config:
    return testing.config(
        node="n",
        smtp__hostname="trap.test",
        traps__catch_all=True,
        sets=[SetConfig(name="all")],
        **{f"smtp__{k}": v for k, v in smtp.items()},
    )


def _factory(cfg: Config) -> tuple[TrapSMTPFactory, task.Clock]:
    clock = task.Clock()
    f = TrapSMTPFactory(cfg, lambda env: defer.succeed(None), Metrics(), clock)
    return f, clock


def _connect(f: TrapSMTPFactory, host: str, port: int = 40000) -> tuple[TrapSMTP, StringTransport]:
    p = f.buildProtocol(None)
    family = "TCP"
    peer: Any = (
        address.IPv6Address(family, host, port)
        if ":" in host
        else address.IPv4Address(family, host, port)
    )
    local = address.IPv4Address("TCP", "198.51.100.1", 25)
    t = StringTransport(peerAddress=peer, hostAddress=local)
    p.makeConnection(t)
    return p, t


def _refused(t: StringTransport) -> bool:
    return t.value().startswith(b"421 4.7.0") and bool(t.disconnecting)


def test_per_ip_limit_is_on_by_default_and_generous() -> None:
    assert Config().smtp.max_connections_per_ip == 200
    f, _ = _factory(_config())
    conns = [_connect(f, "192.0.2.7", 1000 + i) for i in range(200)]
    assert not any(_refused(t) for _, t in conns)
    p, t = _connect(f, "192.0.2.7", 5000)
    assert _refused(t)
    # Another address is not affected.
    _, t2 = _connect(f, "192.0.2.8")
    assert t2.value().startswith(b"220")
    # A slot freed is a slot to reuse, and the count goes back to zero.
    p.connectionLost(None)
    conns[0][0].connectionLost(None)
    _, t3 = _connect(f, "192.0.2.7", 6000)
    assert t3.value().startswith(b"220")
    assert f.per_ip["192.0.2.7"] == 200


def test_behind_a_trusted_balancer_the_original_client_is_counted() -> None:
    cfg = _config(max_connections_per_ip=3)
    cfg = testing.config(cfg, smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"])
    f, _ = _factory(cfg)
    sessions = []
    # 10 clients through one HAProxy: none is capped by the balancer's address.
    for i in range(10):
        p, t = _connect(f, "192.0.2.1", 2000 + i)
        p.dataReceived(proxy.build_v1((f"203.0.113.{i + 1}", 5555), ("198.51.100.1", 25)))
        assert t.value().startswith(b"220"), t.value()
        sessions.append(p)
    assert "192.0.2.1" not in f.per_ip
    # One client through it is: its 4th session is refused.
    for i in range(4):
        p, t = _connect(f, "192.0.2.1", 3000 + i)
        p.dataReceived(proxy.build_v2(("203.0.113.200", 6000 + i), ("198.51.100.1", 25)))
        sessions.append(p)
    assert _refused(t)
    assert f.per_ip["203.0.113.200"] == 3
    for p in sessions:
        p.connectionLost(None)
    assert f.per_ip == {} and not f.sessions


def test_a_proxied_session_that_never_sends_its_header_counts_nowhere() -> None:
    cfg = _config(max_connections_per_ip=1)
    cfg = testing.config(cfg, smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"])
    f, _ = _factory(cfg)
    p, _ = _connect(f, "192.0.2.1")
    assert f.per_ip == {} and p in f.sessions
    p.connectionLost(None)
    assert f.per_ip == {} and not f.sessions


def test_trusted_relays_are_not_capped() -> None:
    cfg = _config(max_connections_per_ip=2, trusted_relays=["192.0.2.25/32"])
    f, _ = _factory(cfg)
    conns = [_connect(f, "192.0.2.25", 1000 + i) for i in range(5)]
    assert not any(_refused(t) for _, t in conns)


def test_ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    f, _ = _factory(_config(max_connections_per_ip=2))
    _connect(f, "2001:db8:1:2::1")
    _connect(f, "2001:db8:1:2::2")
    _, t = _connect(f, "2001:db8:1:2:ffff::3")
    assert _refused(t)


def test_max_connections_still_counts_every_connection() -> None:
    cfg = _config(max_connections=3)
    cfg = testing.config(cfg, smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"])
    f, _ = _factory(cfg)
    for i in range(3):
        _connect(f, "192.0.2.1", 1000 + i)  # no header yet: they hold slots
    _, t = _connect(f, "198.51.100.9")
    assert _refused(t)


def test_idle_before_the_first_mail_closes_after_60s() -> None:
    cfg = _config()
    assert cfg.smtp.timeouts.idle_before_mail == 60
    f, clock = _factory(cfg)
    p, t = _connect(f, "192.0.2.7")
    p.dataReceived(b"EHLO x\r\n")
    clock.advance(59)
    assert not t.disconnecting
    clock.advance(1)
    assert t.value().endswith(b"421 4.4.2 Timeout, closing connection\r\n")
    assert t.disconnecting


def test_after_mail_the_command_timeout_applies() -> None:
    f, clock = _factory(_config())
    p, t = _connect(f, "192.0.2.7")
    clock.advance(50)
    p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")
    clock.advance(299)
    assert not t.disconnecting
    clock.advance(1)
    assert t.disconnecting
    # After a delivered message too: the session has shown it sends mail.
    p2, t2 = _connect(f, "192.0.2.8")
    p2.dataReceived(b"MAIL FROM:<a@b>\r\nRCPT TO:<v@t.example>\r\nDATA\r\nx\r\n.\r\n")
    assert b"250 2.0.0 Ok: queued" in t2.value()
    clock.advance(120)
    assert not t2.disconnecting


def test_a_proxied_session_idle_before_its_header_is_closed() -> None:
    cfg = _config()
    cfg = testing.config(cfg, smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"])
    f, clock = _factory(cfg)
    _, t = _connect(f, "192.0.2.1")
    clock.advance(60)
    assert t.disconnecting


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("smtp: {max_connections_per_ip: -1}", "at least 0"),
        ("smtp: {timeouts: {idle_before_mail: 0}}", "more than 0"),
        ("smtp: {stop_grace: -1}", "stop_grace"),
        ("smtp: {data_memory_budget: 1KiB}", "at least"),
    ],
)
def test_bad_limits_are_config_errors_with_line_numbers(
    tmp_path: Any, line: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node: n\ntraps: {catch_all: true}\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert ":3:" in str(e.value) and message in str(e.value)


def test_limits_parse(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "node: n\ntraps: {catch_all: true}\n"
        "smtp:\n  max_connections_per_ip: 0\n  stop_grace: 30s\n"
        "  data_memory_budget: 16MiB\n  data_spill_threshold: 256KiB\n"
        "  timeouts: {idle_before_mail: 2m}\n"
    )
    cfg = load_config(str(path))
    assert cfg.smtp.max_connections_per_ip == 0
    assert cfg.smtp.stop_grace == 30
    assert cfg.smtp.data_memory_budget == 16 * 1024 * 1024
    assert cfg.smtp.data_spill_threshold == 256 * 1024
    assert cfg.smtp.timeouts.idle_before_mail == 120
