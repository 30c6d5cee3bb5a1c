"""Reverse DNS of SMTP peers: optional, non-blocking, never delaying a reply.

Off by default (``smtp.rdns``). When on, the lookup starts at connect time
and its answer is used if it has arrived by the end of DATA; a slow or
failing resolver only means no ``X-Spamtrap-Rdns`` field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

# Seconds a PTR query may take: well inside a typical SMTP transaction.
TIMEOUT = (2, 3)


def ptr_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def make_lookup(resolver: Any = None) -> Callable[[str], defer.Deferred[str]]:
    """A PTR lookup function. ``resolver`` is an IResolver (tests pass a fake);
    by default Twisted's own resolver, built from /etc/resolv.conf, which
    does not use the reactor's thread pool."""
    if resolver is None:
        from twisted.names import client

        resolver = client.createResolver()

    def lookup(ip: str) -> defer.Deferred[str]:
        try:
            name = ptr_name(ip)
        except ValueError:
            return defer.fail(ValueError(f"not an IP address: {ip!r}"))
        d = resolver.lookupPointer(name, timeout=TIMEOUT)
        d.addCallback(_first_ptr)
        return d

    return lookup


def _first_ptr(result: Any) -> str:
    answers = result[0]
    for rr in answers:
        payload = getattr(rr, "payload", None)
        target = getattr(payload, "name", None)
        if target is not None:
            return str(target).rstrip(".")
    raise LookupError("no PTR record")
