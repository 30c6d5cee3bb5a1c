"""What an SMTP session knows of itself, gathered for the envelope of each
message it delivers: :class:`SessionMetadata` is a mixin of
:class:`spamtrap.intake.smtp.TrapSMTP`; the envelope itself is built by
:func:`spamtrap.intake.envelope.build_envelope`, a pure function of these
facts and the transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spamtrap.intake.base import SessionBase
from spamtrap.intake.envelope import SessionFacts, Transaction, build_envelope
from spamtrap.message import Envelope, new_message_id

if TYPE_CHECKING:
    from spamtrap.intake import relay


def host_port(address: Any) -> tuple[str, int]:
    """(host, port) of a Twisted address (or a bare host)."""
    return str(getattr(address, "host", address)), int(getattr(address, "port", 0) or 0)


class SessionMetadata(SessionBase):
    """The session's facts for :class:`spamtrap.intake.smtp.TrapSMTP` (a mixin)."""

    session_id: str
    connected_at: float
    first_command_at: float | None
    local: tuple[str, int] | None  # looked up when first needed
    proxied_by: tuple[str, int] | None
    rdns: str | None

    if TYPE_CHECKING:

        def _attribution(self, content: bytes) -> tuple[relay.Client | None, str]: ...

    def _local(self) -> tuple[str, int]:
        # A getsockname() call: only sessions that deliver need it.
        if self.local is None:
            self.local = host_port(self.transport.getHost())
        return self.local

    def _tls_facts(self) -> str | None:
        if not self.startedTLS:
            return None
        conn: Any = getattr(getattr(self.transport, "protocol", None), "_tlsConnection", None)
        try:
            return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
        except Exception:  # noqa: BLE001 - the facts are best effort
            return "unknown"

    def _facts(self, content: bytes) -> SessionFacts:
        """What the session knows now, for the envelope of ``content``."""
        client, via = self._attribution(content)
        if via:
            self.dialect.flags.add("relayed")  # the dialect is the relay's, not the bot's
        f = self.factory
        return SessionFacts(
            node=f.config.node,
            host=f.host_text,
            session_id=self.session_id,
            peer=self.peer,
            local=self._local(),
            proxied_by=self.proxied_by,
            rdns=self.rdns,
            helo=self._helo_arg,
            esmtp=self._helo_verb == b"EHLO",
            started_tls=bool(self.startedTLS),
            tls=self._tls_facts(),
            dialect=self.dialect.render(),
            connected_at=self.connected_at,
            first_command_at=self.first_command_at,
            data_started_at=self.data_started_at,
            client=client,
            via=via,
            relay_helo=self._relay_helo,
        )

    def _envelope(self, txn: Transaction, content: bytes) -> Envelope:
        now = self.factory.clock.seconds()
        msg_id = new_message_id(self.factory.config.node, now)
        return build_envelope(self._facts(content), txn, content, msg_id, now)
