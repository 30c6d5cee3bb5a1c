"""A worked example of an operator's own spamtrap stage (see docs/stages.md).

It shows all three things a stage can do:

- add metadata: a message whose HELO/EHLO argument is an IP address
  literal ("[192.0.2.1]", "[IPv6:2001:db8::1]", or a bare "192.0.2.1",
  which bots send although RFC 5321 4.1.3 wants brackets) is tagged with
  ``x_helo_literal`` (the address);
- route: messages from the feeds named in ``feed_sets`` also land in those
  sets (with ``only: true``: only in them);
- discard: messages whose HELO is one of ``discard_helo`` (say, your own
  monitoring probe) are dropped with the reason ``probe``.

Configure it with::

    filters:
      custom:
        example:
          callable: example_stage:make     # with docs/ on PYTHONPATH
          options:
            feed_sets: {donor1: [donor1-only]}
            discard_helo: [probe.trap.example]
      order: [size, virus, clamd, feeds, example, lists, bounce, spamd]
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from spamtrap.filters import Discard, Route
from spamtrap.message import Envelope


def ip_literal(helo: str) -> str | None:
    """The address in a HELO argument that is an address literal, else None."""
    text = helo.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class HeloLiteralStage:
    def __init__(
        self, feed_sets: Mapping[str, list[str]], only: bool, discard_helo: frozenset[str]
    ) -> None:
        # Built once, read-only afterwards: safe to share between worker threads.
        self.feed_sets = feed_sets
        self.only = only
        self.discard_helo = discard_helo

    def __call__(self, env: Envelope) -> Discard | Route | None:
        helos = env.values("helo")  # absent when the client never said HELO
        if any(h.strip().lower() in self.discard_helo for h in helos):
            return Discard("probe")
        for helo in helos:
            address = ip_literal(helo)
            if address is not None:
                env.meta.setdefault("x_helo_literal", []).append(address)
        sets = self.feed_sets.get(env.feed or "")
        if sets:
            return Route(list(sets), only=self.only)
        return None


def make(
    feed_sets: Mapping[str, Sequence[str]] | None = None,
    only: bool = False,
    discard_helo: Sequence[str] = (),
) -> HeloLiteralStage:
    """The factory named in the config; the options arrive as keywords.

    Check the options here: an error raised now stops start-up with the
    stage's name, instead of surfacing per message later.
    """
    feed_sets = dict(feed_sets or {})
    for feed, sets in feed_sets.items():
        if isinstance(sets, str) or not all(isinstance(s, str) for s in sets):
            raise ValueError(f"feed_sets.{feed}: expected a list of set names")
    if not isinstance(only, bool):
        raise ValueError("only: expected true or false")
    if isinstance(discard_helo, str):
        raise ValueError("discard_helo: expected a list of names")
    return HeloLiteralStage(
        {feed: list(sets) for feed, sets in feed_sets.items()},
        only,
        frozenset(h.lower() for h in discard_helo),
    )
