"""DATA as raw bytes: the end-of-data scan and the spill to disk.

:class:`DataIntake` is a mixin of :class:`spamtrap.intake.smtp.TrapSMTP`. It moves
the bytes after 354 into the message, finds the end of data (strict
CRLF.CRLF for CRLF clients, flagging SMTP smuggling lookalikes; LF.LF for
bare-LF bots), undoes dot-stuffing, enforces max_message_size, and moves
DATA over the memory budget to a spill file (:mod:`spamtrap.intake.spill`). The
finished message goes to ``TrapSMTP._deliver``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from spamtrap.intake import spill as spill_mod
from spamtrap.intake.base import SessionBase
from spamtrap.intake.state import SessionState

COMMAND = SessionState.COMMAND
REPLY_PENDING = SessionState.REPLY_PENDING
CLOSED = SessionState.CLOSED

log = Logger(namespace="spamtrap.intake.smtp")

DATA_SENTINEL = b"\r\n"  # DATA is scanned as if preceded by a line end


def _lf_end(data: bytearray, start: int) -> tuple[int, int]:
    """A bare-LF client's end of data from ``start``: (index of the LF before
    the dot, length of the terminator), or (-1, 0)."""
    lf = data.find(b"\n.\n", start)
    # A LF.CRLF before it ends the data first (the bound keeps the scan short).
    crlf = data.find(b"\n.\r\n", start, lf + 4 if lf >= 0 else len(data))
    if crlf >= 0:
        return crlf, 4
    return lf, (3 if lf >= 0 else 0)


_CR_AS_LF = bytes.maketrans(b"\r", b"\n")


def _crlf_end(data: bytearray, start: int) -> tuple[int, bool]:
    """A CRLF client's end of data from ``start``: (index of CRLF.CRLF or -1,
    whether an end-of-data lookalike came before it).

    With CR read as LF, "LF . LF" is found in the middle of CRLF.CRLF and in
    every lookalike (a dot between line-end bytes), and nowhere else: one
    translate and one find, about 1.6 times the plain search, find both.
    """
    t = (data if start == 0 else data[start:]).translate(_CR_AS_LF)
    p = t.find(b"\n.\n")
    if p >= 0:
        i = start + p
        if i > 0 and data[i - 1] == 13 and data[i] == 10 and data[i + 2] == 13:
            if i + 3 == len(data):
                return -1, False  # CRLF.CR so far: the next read tells
            if data[i + 3] == 10:
                return i - 1, False
        # A lookalike. The rest needs only the plain search: a message full
        # of them must not cost a Python loop per dot.
        return data.find(b"\r\n.\r\n", i), True
    return -1, False


class DataIntake(SessionBase):
    """DATA handling of :class:`spamtrap.intake.smtp.TrapSMTP` (a mixin)."""

    def _data_chunk(self) -> bool:
        """Move buffered bytes into the message; True once it has ended.

        Each read is searched from 4 bytes before its start, so a message
        costs one pass however TCP cut it. Which end of data counts depends
        on the client (see README "SMTP behaviour"):

        - a client that ended any command line so far (DATA included) with
          CRLF gets strict CRLF.CRLF. Every other end-of-data lookalike
          (LF.LF, CR.CR, LF.CRLF, CRLF.LF, CR.CRLF, CRLF.CR) stays data and
          flags the session "smuggling": a relay behind us that accepted it
          would see a second, forged message (SMTP smuggling, SEC Consult
          2023, CVE-2023-51764). A lone LF is data too, so ``LF..`` keeps
          both dots: a line starts after CRLF only.
        - a client whose command lines all ended in bare LF is a bare-LF
          bot. QUIRK: RFC 5321 2.3.8 forbids bare LF, but such bots end DATA
          with LF.LF and would time out unanswered. A line starts after any
          LF, so LF.LF and LF.CRLF end its data and LF-led dots are
          unstuffed (RFC 5321 4.5.2 applied to its lines).
        """
        data = self._data
        start = max(len(data) - 4, 0)
        data += self._buf
        self._buf.clear()
        if self._crlf_client:
            skip = 5
            if "smuggling" in self.dialect.flags:
                end = data.find(b"\r\n.\r\n", start)
            else:
                end, smuggled = _crlf_end(data, start)
                if smuggled:
                    self.dialect.flags.add("smuggling")
        else:
            end, skip = _lf_end(data, start)
        if end < 0:
            if self._over_size(0, len(data)):
                # Past the limit: keep only what can still hold the terminator.
                self._data_overflow = True
                del data[:-4]
            self._hold_or_spill()
            return False
        self._buf += data[end + skip :]
        self._move(COMMAND)
        self._set_idle(self.timeout)
        if self._data_ended(data, end):
            return True
        if self._data_overflow or self._over_size(0, end):
            self._end_transaction()
            self._data = bytearray()
            self.factory.metrics.messages_rejected.labels(reason="size").inc()
            self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
            return True
        # RFC 5321 4.5.2: drop the first period of every line that has one.
        eol = self._line_end
        content = bytes(data[: end + len(eol)]).replace(eol + b".", eol)[len(DATA_SENTINEL) :]
        self._data = bytearray()
        self._deliver(content)
        return True

    @property
    def _line_end(self) -> bytes:
        """What a line of this client's DATA ends with, as _data_chunk reads
        it: CRLF for a client whose commands end in CRLF, else LF."""
        return b"\r\n" if self._crlf_client else b"\n"

    def _over_size(self, base: int, length: int) -> bool:
        """Whether DATA ``length`` bytes into the scanned buffer (which has
        DATA_SENTINEL in front), ``base`` bytes of it already spilled, is
        over max_message_size: the one size check of the data path."""
        return base + length - len(DATA_SENTINEL) > self.factory.config.smtp.max_message_size

    # -- DATA over the memory budget: the spill -------------------------------

    def _count_data(self, n: int) -> None:
        self.factory.data_in_memory += n - self._data_counted
        self._data_counted = n

    def _hold_or_spill(self) -> None:
        """After a read that did not end the DATA: keep it in memory, or move
        it to a spill file and keep only the bytes the next scan needs."""
        data = self._data
        spill = self._spill
        cfg = self.factory.config.smtp
        if self._data_overflow:
            if spill is not None:  # rejected anyway: no more writing
                spill.discard()
                self._spill = None
            self._count_data(len(data))
            return
        if spill is None:
            self._count_data(len(data))
            f = self.factory
            if f.spill is None or (
                len(data) <= cfg.data_spill_threshold
                and f.data_in_memory <= cfg.data_memory_budget
            ):
                return
            spill = self._spill = f.spill.open(self._line_end, skip=len(DATA_SENTINEL))
            spill.on_drained = self._spill_drained
        if self._over_size(self._data_base, len(data)):
            # As _data_chunk does in memory: keep what can hold the terminator.
            self._data_overflow = True
            spill.discard()
            self._spill = None
            self._data = bytearray(data[-4:])
            self._count_data(4)
            return
        cut = len(data) - spill_mod.CONTEXT
        if cut > 0:
            spill.feed(bytes(memoryview(data)[:cut]))
            self._data_base += cut
            # A new, small bytearray: deleting from the front would keep the
            # old allocation.
            self._data = bytearray(memoryview(data)[cut:])
        self._count_data(len(self._data))
        if spill.pending_bytes > spill_mod.PENDING_MAX and not self._spill_paused:
            # The disk is slower than the peer: stop reading it meanwhile.
            self._spill_paused = True
            self.transport.pauseProducing()

    def _spill_drained(self) -> None:
        if self._spill_paused:
            self._spill_paused = False
            if not self._paused and self._state is not CLOSED:
                self.transport.resumeProducing()

    def _data_ended(self, data: bytearray, end: int) -> bool:
        """At the end of data (``end`` as _data_chunk found it): True if the
        message was spilled and is now on its way (or refused), False for
        _data_chunk to go on with one held in memory."""
        self._count_data(0)
        spill, self._spill = self._spill, None
        base, self._data_base = self._data_base, 0
        if spill is None:
            return False
        if self._data_overflow or self._over_size(base, end):
            spill.discard()
            self._data_overflow = True  # _data_chunk answers 552
            return False
        spill.feed(bytes(data[: end + len(self._line_end)]))
        self._data = bytearray()
        # Input is held while the content is read back, as while the spool
        # writes it.
        self._move(REPLY_PENDING)
        self._idle_period = None
        size = spill.size
        f = self.factory
        assert f.spill is not None
        d = defer.ensureDeferred(spill.content(f.config.smtp.data_memory_budget))
        d.addCallbacks(self._spill_read, self._spill_failed, callbackArgs=(size,))
        return True

    def _spill_read(self, content: bytes, size: int) -> None:
        spills = self.factory.spill
        assert spills is not None
        if self._state is CLOSED:  # never acknowledged: the client retries
            spills.unreserve(size)
            return
        self._move(COMMAND)
        d = self._deliver(content)
        del content  # the envelope holds it until the spool has it

        def unreserve(result: Any) -> Any:
            spills.unreserve(size)
            return result

        d.addBoth(unreserve)

    def _spill_failed(self, failure: Any) -> None:
        log.failure("spilled DATA from {peer} lost", failure, peer=self.peer[0])
        self.factory.metrics.messages_rejected.labels(reason="spool").inc()
        self._end_transaction()
        self._resume(451, b"4.3.0 Error: queue file write error, try again")
