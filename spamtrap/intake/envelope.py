"""The envelope of an accepted message, built as a pure function.

:func:`build_envelope` turns what an SMTP session knows (:class:`SessionFacts`:
peer, local address, PROXY and relay facts, HELO, TLS, the rendered dialect
and the session's times) and one :class:`Transaction` into the
:class:`~spamtrap.message.Envelope` the spool stores: its metadata fields and
the pieces of its Received line. It reads no clock, no socket and no
protocol state, so the metadata a researcher relies on can be tested, and
reasoned about, without a session (see tests/unit/test_envelope_build.py). The
session (spamtrap/intake/smtp.py) gathers the facts; the message id and the time
of receipt are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from spamtrap.intake import relay
from spamtrap.intake.parse import bucket
from spamtrap.intake.relay import as_text
from spamtrap.message import Envelope, iso_time, rfc2822_date


def _path_field(address: str, params: tuple[bytes, ...]) -> str:
    """A MAIL FROM or RCPT TO as recorded: ``<address> PARAM=1 ...``."""
    if not params:
        return f"<{address}>"
    return " ".join([f"<{address}>", *map(as_text, params)])


class Transaction:
    """One MAIL ... DATA transaction."""

    __slots__ = ("mail_from", "params", "rcpts", "feed")

    def __init__(self, mail_from: bytes, params: tuple[bytes, ...]) -> None:
        self.mail_from = mail_from
        self.params = params
        self.rcpts: list[tuple[bytes, tuple[bytes, ...]]] = []
        self.feed: str | None = None


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What a session knows of itself when a message ends.

    ``peer`` and ``local`` are the connection's ends (after any PROXY
    header); ``client`` and ``via`` are the original client behind a
    trusted relay and how it was learnt (``xforward``, ``xclient``,
    ``derived``, ``unknown``; ``""``: not from a relay), ``relay_helo`` the
    relay's own HELO argument. ``helo`` is the argument the session's peer
    gave (None: none yet), ``esmtp`` whether it said EHLO.
    """

    node: str
    host: str  # the trap's own name, for the Received line
    session_id: str
    peer: tuple[str, int]
    local: tuple[str, int]
    proxied_by: tuple[str, int] | None
    rdns: str | None
    helo: bytes | None
    esmtp: bool
    started_tls: bool
    tls: str | None  # "TLSv1.3 CIPHER", "unknown", or None without TLS
    dialect: str  # rendered, flags included
    connected_at: float
    first_command_at: float | None
    data_started_at: float
    client: relay.Client | None = None
    via: str = ""
    relay_helo: bytes | None = None


def build_envelope(
    facts: SessionFacts, txn: Transaction, content: bytes, msg_id: str, now: float
) -> Envelope:
    """The envelope of ``content``, received at ``now`` as ``msg_id``.

    Every metadata field appears at most once per message, ``rcpt`` once
    per recipient. ``txn`` must have at least one recipient (DATA is
    refused before that): ValueError otherwise.
    """
    if not txn.rcpts:
        raise ValueError(f"session {facts.session_id}: message {msg_id} has no recipient")
    mail_from = as_text(txn.mail_from)
    rcpts = [as_text(a) for a, _ in txn.rcpts]
    helo = as_text(facts.helo) if facts.helo is not None else None
    peer_host, peer_port = facts.peer
    local_host, local_port = facts.local
    rdns = facts.rdns
    proto: str | None = None
    via = facts.via
    client = facts.client
    relay_field: str | None = None
    if via:
        # From a trusted relay: Peer, Rdns and Helo describe the original
        # client; Relay names the relay and how the client was learnt.
        own_helo = facts.relay_helo if via == "xclient" else facts.helo
        relay_helo = as_text(own_helo) if own_helo else "-"
        relay_field = f"{peer_host} {peer_port} {relay_helo} {via}"
    if client is not None and client.addr:
        peer_host, peer_port = client.addr, client.port
        rdns, helo, proto = client.name, client.helo, client.proto
        if via == "xclient" and client.destaddr:
            local_host, local_port = client.destaddr, client.destport
    meta: dict[str, list[str]] = {
        "id": [msg_id],
        "node": [facts.node],
        "session": [facts.session_id],
        "peer": [f"{peer_host} {peer_port}"],
        "local": [f"{local_host} {local_port}"],
    }
    if facts.proxied_by:
        meta["proxy"] = [f"{facts.proxied_by[0]} {facts.proxied_by[1]}"]
    if relay_field is not None:
        meta["relay"] = [relay_field]
    if rdns:
        meta["rdns"] = [rdns]
    if helo is not None:
        meta["helo"] = [helo]
    if facts.tls:
        meta["tls"] = [facts.tls]
    meta["mail_from"] = [_path_field(mail_from, txn.params)]
    meta["rcpt"] = [_path_field(r, p) for r, (_, p) in zip(rcpts, txn.rcpts, strict=True)]
    domains = dict.fromkeys(r.rpartition("@")[2].lower() for r in rcpts if "@" in r)
    if domains:
        meta["domain"] = list(domains)
    if txn.feed:
        meta["feed"] = [txn.feed]
    connected = facts.connected_at
    meta["connected"] = [iso_time(connected)]
    meta["received"] = [iso_time(now)]
    meta["size"] = [str(len(content))]
    meta["dialect"] = [facts.dialect]
    first = (facts.first_command_at or now) - connected
    meta["timing"] = [
        f"first-cmd={bucket(first)} data={bucket(now - facts.data_started_at)} "
        f"session={bucket(now - connected)}"
    ]
    with_ = "ESMTP" if facts.esmtp else "SMTP"
    if facts.started_tls:
        with_ += "S"
    if proto:
        with_ = proto  # as the relay received it (Postfix does the same)
    # Pieces between folds, kept apart so that a CR LF TAB a sender or
    # relay put in a value is escaped, not taken for a fold.
    received = [
        f"from {helo or 'unknown'} ({rdns or 'unknown'} [{peer_host}])",
        f"by {facts.host} (spamtrap) with {with_} id {msg_id}",
        f"(envelope-from <{mail_from}>)",
        f"for <{rcpts[0]}>; {rfc2822_date(now)}",  # last: split_block ends the block here
    ]
    return Envelope(
        msg_id=msg_id,
        received_at=now,
        mail_from=mail_from,
        rcpts=rcpts,
        data=content,
        feed=txn.feed,
        meta=meta,
        received=received,
    )
