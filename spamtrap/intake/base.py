"""What the parts of an SMTP session share: its attributes, declared once.

:class:`SessionBase` is the common base of the mixins that make up
:class:`spamtrap.intake.smtp.TrapSMTP` (:mod:`spamtrap.intake.commands`,
:mod:`spamtrap.intake.relay_commands`, :mod:`spamtrap.intake.data`). It declares the
session's state with its types, so that each mixin is type-checked on its
own, and the few session methods the mixins call (for the type checker
only: at run time they are TrapSMTP's). It adds no behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spamtrap.intake import relay

if TYPE_CHECKING:
    from twisted.internet import defer

    from spamtrap.intake.envelope import Transaction
    from spamtrap.intake.parse import Dialect
    from spamtrap.intake.smtp import TrapSMTPFactory
    from spamtrap.intake.spill import Spill
    from spamtrap.intake.state import SessionState


class SessionBase:
    factory: TrapSMTPFactory
    transport: Any  # zope interfaces do not type-check as attributes without a plugin
    # Set by twisted.mail.smtp.ESMTP (untyped there).
    host: Any
    ctx: Any
    canStartTLS: Any
    startedTLS: Any
    timeout: Any

    _state: SessionState  # moved only by TrapSMTP._move
    _paused: bool
    peer: tuple[str, int]
    dialect: Dialect
    _buf: bytearray
    _helo_verb: bytes
    _helo_arg: bytes | None
    _txn: Transaction | None
    _mailed: bool
    _idle_period: float | None
    # DATA (spamtrap/intake/data.py)
    _data: bytearray
    _data_overflow: bool
    _crlf_client: bool
    _data_base: int
    _data_counted: int
    _spill: Spill | None
    _spill_paused: bool
    data_started_at: float
    # Attribution behind a trusted relay (smtp.trusted_relays): the client
    # XCLIENT named for the session, the one XFORWARD named for the next
    # transaction, the relay's own HELO from before XCLIENT, and whether the
    # peer is a trusted relay at all (looked up once, after any PROXY header).
    _xclient: relay.Client | None = None
    _xforward: relay.Client | None = None
    _relay_helo: bytes | None = None
    _relay_trusted: bool | None = None

    def _end_transaction(self) -> None:
        """The transaction is over (delivered, refused or reset): its MAIL and
        RCPTs go, and so do a relay's XFORWARD attributes, which last one
        transaction (XFORWARD_README)."""
        self._txn = None
        self._xforward = None

    if TYPE_CHECKING:

        def sendCode(self, code: int, message: bytes = b"") -> None: ...
        def greeting(self) -> bytes: ...
        def listExtensions(self) -> bytes: ...
        def _move(self, new: SessionState) -> None: ...
        def _set_idle(self, period: float | None) -> None: ...
        def _deliver(self, content: bytes) -> defer.Deferred[Any]: ...
        def _resume(self, code: int, message: bytes) -> None: ...
        def _from_relay(self) -> bool: ...
