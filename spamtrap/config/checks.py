"""Cross-checks, run on each built object: what one key's rule cannot see.

A check reports problems through the walker. The config is frozen, so a
check that completes an object from what the document left out (the stage
order, the default set) returns the completed copy; the others return None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from spamtrap.config.filter_schema import BUILTIN_STAGES, FilterConfig, ListRule
from spamtrap.config.nodes import _entry, _join, option_of
from spamtrap.config.rules import _unknown
from spamtrap.config.schema import (
    Condition,
    Config,
    FeedConfig,
    OutputConfig,
    SetConfig,
    TLSConfig,
)
from spamtrap.message import META_FIELDS

if TYPE_CHECKING:
    from spamtrap.config.walker import _Walker


def forged_header_problem(header: str) -> str | None:
    """Why a ``header:`` rule may not name one of our X-Spamtrap-* fields.

    Those names in a message's header are the sender's own (our metadata is
    read with ``meta:``): a spammer writing ``X-Spamtrap-Feed: donor1`` must
    not steer its message into a set.
    """
    lower = header.lower()
    if not lower.startswith("x-spamtrap-"):
        return None
    meta = next((k for k, v in META_FIELDS.items() if v.lower() == lower), None)
    if meta is None and lower.startswith("x-spamtrap-x-"):
        meta = "x_" + lower[len("x-spamtrap-x-") :].replace("-", "_")
    hint = f"'meta: {meta}'" if meta else "'meta:' and a metadata field name"
    return (
        f"header {header!r} would read the message's own header fields, which any"
        f" sender can forge; read spamtrap's metadata with {hint} instead"
    )


def _check_forged_header(w: _Walker, header: str | None, node: yaml.Node, path: str) -> None:
    problem = forged_header_problem(header) if header is not None else None
    if problem and w.clean(path):
        found = _entry(node, "header")
        w.error(found[1] if found else node, _join(path, "header"), problem)


def _check_header_or_meta(
    w: _Walker, cond: Condition | ListRule, node: yaml.Node, path: str
) -> None:
    """A set condition or a discard-list rule reads one header or one field."""
    if w.clean(path) and (cond.header is None) == (cond.meta is None):
        which = "both are given" if cond.header else "neither is given"
        w.error(node, path, f"needs exactly one of 'header' or 'meta' ({which})")
    _check_forged_header(w, cond.header, node, path)


def _check_filters(w: _Walker, f: FilterConfig, node: yaml.Node, path: str) -> FilterConfig:
    known = BUILTIN_STAGES + [c.name for c in f.custom]
    clash = [c.name for c in f.custom if c.name in BUILTIN_STAGES]
    found = _entry(node, "custom")
    for name in clash:
        w.error(
            found[1] if found else node,
            _join(path, f"custom.{name}"),
            f"{name!r} is a built-in stage name; pick another",
        )
    for which in ("clamd", "spamd"):
        service = getattr(f, which)
        if service.enabled and service.timeout >= f.stage_budget:
            found = _entry(node, which)
            w.error(
                found[1] if found else node,
                _join(path, f"{which}.timeout"),
                f"must be below filters.stage_budget ({f.stage_budget:g}s): a slower answer"
                " is ignored as over budget",
            )
    found = _entry(node, "order")
    if found is None:  # custom stages run last
        return dataclasses.replace(f, order=f.order + [c.name for c in f.custom])
    seen: set[str] = set()
    for i, name in enumerate(f.order):
        item = found[1].value[i] if isinstance(found[1], yaml.SequenceNode) else found[1]
        if name not in known:
            w.error(item, f"{path}.order[{i}]", _unknown("stage", name, known))
        elif name in seen:
            w.error(item, f"{path}.order[{i}]", f"stage {name!r} is listed twice")
        seen.add(name)
    return f


def _check_feed(w: _Walker, feed: FeedConfig, node: yaml.Node, path: str) -> None:
    if not w.clean(path):
        return
    by_host = feed.strip_received_by or feed.strip_received_by_regex
    if feed.strip_received and by_host:
        found = _entry(node, "strip_received")
        w.error(
            found[0] if found else node,
            _join(path, "strip_received"),
            "give strip_received (a count, deprecated) or strip_received_by /"
            " strip_received_by_regex (the donor's hosts), not both",
        )
    if feed.donor_networks and not by_host:
        found = _entry(node, "donor_networks")
        w.error(
            found[0] if found else node,
            _join(path, "donor_networks"),
            "donor_networks needs strip_received_by or strip_received_by_regex"
            " (it says which hops into the donor's hosts are the donor's own)",
        )


def _check_tls(w: _Walker, tls: TLSConfig, node: yaml.Node, path: str) -> None:
    found = _entry(node, "key")
    if tls.key is not None and tls.certificate is None and found:
        w.error(found[1], _join(path, "key"), "a key needs a certificate")


def _check_output(w: _Walker, out: OutputConfig, node: yaml.Node, path: str) -> None:
    """The kind's own cross-checks (``problems()``), each at its key's line."""
    if not w.clean(path):
        return
    for key, message in out.problems():
        found = _entry(node, key)
        w.error(found[1] if found else node, _join(path, key), message)


def _check_output_sets(w: _Walker, cfg: Config) -> None:
    """Every set an output lists is a configured set."""
    if not w.clean("sets"):
        return
    names = [s.name for s in cfg.sets]
    for out in cfg.outputs:
        out_node, out_path = w.origin[id(out)]
        if not w.clean(_join(out_path, "sets")):
            continue
        found = _entry(out_node, "sets")
        for i, name in enumerate(out.sets):
            if name in names:
                continue
            item = found[1] if found else out_node
            if isinstance(item, yaml.SequenceNode):
                item = item.value[i]
            w.error(item, f"{out_path}.sets[{i}]", _unknown("set", name, names))


def _check_campaign_caps(w: _Walker, cfg: Config) -> None:
    """A set's per_campaign_cap counts campaigns: they must be assigned."""
    if cfg.campaigns.enabled:
        return
    for s in cfg.sets:
        if s.per_campaign_cap and id(s) in w.origin:
            set_node, set_path = w.origin[id(s)]
            found = _entry(set_node, "per_campaign_cap")
            w.error(
                found[1] if found else set_node,
                _join(set_path, "per_campaign_cap"),
                "per_campaign_cap needs campaigns.enabled: true (no message has a campaign)",
            )


def _check_config(w: _Walker, cfg: Config, node: yaml.Node, path: str) -> Config:
    if cfg.role != "all" and cfg.queue.url is None and w.clean("role") and w.clean("queue"):
        found = _entry(node, "role")
        need = (
            "a queue: --queue redis://HOST:PORT"
            if found and option_of(found[1])
            else "queue.url (the Redis the other role reads or writes)"
        )
        w.error(found[1] if found else node, "role", f"role {cfg.role!r} needs {need}")
    if cfg.role == "worker" and cfg.filters.workers == 0 and w.clean("filters"):
        found = _entry(node, "role")
        w.error(
            found[1] if found else node,
            "role",
            "role 'worker' with filters.workers: 0 would process nothing",
        )
    q = cfg.queue
    if q.password is not None and q.password_file is not None and w.clean("queue"):
        found = _entry(node, "queue")
        w.error(found[1] if found else node, "queue", "give password or password_file, not both")
    if _entry(node, "sets") is None:
        cfg = dataclasses.replace(cfg, sets=[SetConfig(name="all")])
    for attr in ("id", "address"):
        first: dict[str, int] = {}  # value -> line
        for feed in cfg.feeds:
            feed_node, feed_path = w.origin[id(feed)]
            found = _entry(feed_node, attr)
            value_node = found[1] if found else feed_node
            value = getattr(feed, attr)
            if value in first:
                w.error(
                    value_node,
                    _join(feed_path, attr),
                    f"duplicate feed {attr} {value!r} (first on line {first[value]})",
                )
            else:
                first[value] = value_node.start_mark.line + 1
    _check_output_sets(w, cfg)
    _check_campaign_caps(w, cfg)
    t = cfg.traps
    no_trap = not (t.domains or t.addresses or t.patterns or t.catch_all or cfg.feeds)
    # A misspelt top-level key may be the traps or feeds section itself.
    misspelt = any("." not in key for key in w.unknown_keys)
    if no_trap and w.clean("traps") and w.clean("feeds") and not misspelt:
        found = _entry(node, "traps")
        w.error(
            found[0] if found else None,
            "traps",
            "no trap configured: give domains, addresses, patterns or feeds, or catch_all: true",
        )
    return cfg


# A check gets the walker, the built object, its node and its path; it
# returns a completed copy of the object, or None when the object stands.
CHECKS: dict[type, Callable[[_Walker, Any, yaml.Node, str], object | None]] = {
    Condition: _check_header_or_meta,
    ListRule: _check_header_or_meta,
    FilterConfig: _check_filters,
    TLSConfig: _check_tls,
    FeedConfig: _check_feed,
    OutputConfig: _check_output,
    Config: _check_config,
}
