"""The SMTP session's side of a trusted MX relay: XFORWARD and XCLIENT.

:class:`RelayCommands` is a mixin of :class:`spamtrap.intake.smtp.TrapSMTP`. It
holds what a relay in ``smtp.trusted_relays`` said of its client (Postfix's
XFORWARD_README and XCLIENT_README), answers those commands, and tells the
envelope builder who the original client was and how that was learnt
(:meth:`RelayCommands._attribution`). Parsing the attributes and the
relay's Received lines is :mod:`spamtrap.intake.relay`'s.
"""

from __future__ import annotations

from spamtrap.intake import relay
from spamtrap.intake.base import SessionBase
from spamtrap.intake.envelope import as_text


class RelayCommands(SessionBase):
    """XFORWARD and XCLIENT for :class:`spamtrap.intake.smtp.TrapSMTP` (a mixin)."""


    def _from_relay(self) -> bool:
        trusted = self._relay_trusted
        if trusted is None:
            trusted = self._relay_trusted = self.factory.trusts_relay(self.peer[0])
        return trusted

    def _relay_attributes(
        self,
        verb: str,
        rest: bytes,
        allowed: tuple[str, ...],
        current: relay.Client | None,
    ) -> relay.Client | None:
        """The client after this command, or None once refused (replied to)."""
        if not self._from_relay():
            # As Postfix; the attempt is in the dialect, nothing else changes.
            self.factory.metrics.smtp_errors.labels(kind="relay-unauthorized").inc()
            self.sendCode(550, b"5.7.0 Error: insufficient authorization")
            return None
        if self._txn is not None:
            self.sendCode(503, b"5.5.1 Error: MAIL transaction in progress")
            return None
        client = current.copy() if current is not None else relay.Client()
        try:
            relay.apply(client, relay.parse_attributes(verb, rest, allowed))
        except relay.RelayCommandError as e:
            self.factory.metrics.smtp_errors.labels(kind="relay-syntax").inc()
            self.sendCode(501, e.reply.encode("ascii", "replace"))
            return None
        return client

    def do_XFORWARD(self, rest: bytes) -> None:
        # Attributes add up over several commands until the transaction ends.
        client = self._relay_attributes("XFORWARD", rest, relay.XFORWARD_ATTRS, self._xforward)
        if client is not None:
            self._xforward = client
            self.sendCode(250, b"2.0.0 Ok")

    def do_XCLIENT(self, rest: bytes) -> None:
        client = self._relay_attributes("XCLIENT", rest, relay.XCLIENT_ATTRS, self._xclient)
        if client is None:
            return
        if self._xclient is None:
            self._relay_helo = self._helo_arg  # the relay's own, before it spoke for the client
        self._xclient = client
        # XCLIENT_README: the session starts over as for a new client, which
        # must say EHLO again; TLS stays.
        self._helo_arg = None
        self._helo_verb = b""
        self._end_transaction()
        self.sendCode(220, self.greeting())

    def _attribution(self, content: bytes) -> tuple[relay.Client | None, str]:
        """(the original client or None, how it was learnt) for a relayed
        message; (None, "") for one straight from its sender."""
        if not self._from_relay():
            return None, ""
        if self._xforward is not None and self._xforward.addr:
            return self._xforward, "xforward"
        if self._xclient is not None and self._xclient.addr:
            client = self._xclient.copy()
            # XCLIENT HELO= wins: Postfix's smtpd_proxy sends its own
            # "EHLO $smtpd_proxy_ehlo" after XCLIENT. A later EHLO counts
            # only when XCLIENT gave no HELO.
            if client.helo is None and self._helo_arg is not None:
                client.helo = as_text(self._helo_arg)
            return client, "xclient"
        # No XFORWARD: the relay's own Received lines say who its client was,
        # read down past the hops of trusted relays and loopback.
        derived = relay.derive_client(content, self.factory.trusts_hop)
        if derived is not None:
            return derived, "derived"
        return None, "unknown"
