"""debian/spamtrap@.service read as systemd would: its shape, without running
anything."""

from __future__ import annotations

from tests.support.systemd_units import SINGLE, TEMPLATE, one, parse_unit, values


def test_template_shape() -> None:
    """What the operator is promised in docs/debian.md."""
    unit = parse_unit(TEMPLATE)
    assert "spamtrap.service" in values(unit, "Unit", "Conflicts")
    # Stop jobs run before start jobs only with an ordering between the two.
    assert "spamtrap.service" in values(unit, "Unit", "After")
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/default/spamtrap@%i"
    assert one(unit, "Service", "StateDirectory") == "spamtrap"
    assert "DefaultInstance" not in dict(unit["Install"])
    # The same hardening as the single service, key by key.
    single = parse_unit(SINGLE)
    own = {"ExecStart", "SyslogIdentifier", "Environment", "EnvironmentFile"}
    assert {k: v for k, v in single["Service"] if k not in own} == {
        k: v for k, v in unit["Service"] if k not in own
    }
