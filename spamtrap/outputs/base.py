"""The output seam: what every per-message output provides.

An output takes each kept message of the sets it lists, one at a time, from
its own durable queue (``DATA/outputs/<name>/``). The queue, the retries
with backoff and jitter, the rate limit, the bounds and the metrics belong
to the runner (``spamtrap.outputs.runner``); a kind only sends one item
and says how that went:

- the Deferred fires (any result): sent, the entry leaves the queue;
- it fails with ``PermanentFailure``: counted under its ``reason`` and
  dropped (a 5xx from a relay, a report the far end calls malformed);
- it fails with anything else (``TemporaryFailure`` names a reason): the
  entry is retried later, with backoff. A far end that answers garbage is
  a temporary failure, never a crash.

A kind is one module, ``spamtrap/outputs/<type>.py``, with:

- ``Settings``: a dataclass subclassing ``spamtrap.config.schema.OutputConfig``
  (the keys every output has: ``type``, ``sets``, the queue bounds, the rate
  limit), declaring the kind's own keys with ``metadata=rule(...)`` like
  every other section of the config;
- ``build(name, settings, context) -> Output``.

Cowrie's one small ``Output`` class per file is the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from twisted.internet.defer import Deferred

    from spamtrap.config.schema import RelayConfig, SetConfig
    from spamtrap.message import Envelope


class OutputFailure(Exception):  # noqa: N818 - the seam's name: a failure, not a bug
    """A send that did not succeed; ``reason`` is the metric label (a short
    fixed word such as ``timeout``, ``refused``, ``5xx``, ``exit-status``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TemporaryFailure(OutputFailure):
    """Retried with backoff until the entry ages out of its queue."""


class PermanentFailure(OutputFailure):
    """Counted and dropped: retrying would fail the same way."""


@dataclass(frozen=True)
class OutputItem:
    """One queued message for one output."""

    # The copy the set keeps: redacted where the set redacts trap addresses.
    envelope: Envelope
    # The set it was kept in (an output listing several sets gets one item
    # per message and set it was kept in, after each set's dedup).
    set_name: str
    # Which try this is, from 1; a retry after a crash starts again at 1.
    attempt: int = 1

    @property
    def id(self) -> str:
        """``X-Spamtrap-Id``: the same on every retry and after a crash."""
        return self.envelope.msg_id

    def message(self) -> bytes:
        """Our metadata block and the message as received (CRLF line ends)."""
        return self.envelope.stored_bytes("wire")

    def original(self) -> bytes:
        """The message as received, without our metadata block."""
        return self.envelope.data


@dataclass(frozen=True)
class OutputContext:
    """What a kind's ``build`` may use; it acquires nothing at build time
    (sockets, processes and files are opened by ``send`` or ``start``)."""

    reactor: Any  # the running reactor or, in unit tests, a Clock-based double
    node: str
    data_dir: str
    relay: RelayConfig  # the top-level relay, for kinds that send mail
    hostname: str  # the SMTP hostname, for EHLO and generated Message-IDs
    # The configured sets by name: whether a set redacts decides what a
    # report may say of its messages (forward's ARF Original-Rcpt-To). A set
    # missing here counts as one that redacts.
    sets: Mapping[str, SetConfig] = field(default_factory=dict)


class Output(Protocol):
    """One output instance, as built from one entry of ``outputs:``."""

    name: str

    def send(self, item: OutputItem) -> Deferred[object]:
        """Deliver one item; see the module docstring for what failures mean."""
        ...

    def describe(self) -> str:
        """Where it sends to, for the start-up log and /healthz."""
        ...

    def close(self) -> Deferred[None] | None:
        """Let go of sockets and children at stop (may return None)."""
        ...


# What the pipeline hands an output queue: (output name, encoded item, its
# zlib.crc32). One kept copy is one record and one crc for every output
# that lists its set.
Handoff = tuple[str, bytes, int]


class OutputSink(Protocol):
    """What the pipeline hands kept messages to (spamtrap.outputs.service)."""

    def routes(self, set_name: str) -> Sequence[str]:
        """The outputs that list ``set_name``."""
        ...

    def enqueue(self, handoffs: Sequence[Handoff]) -> Deferred[None]:
        """Append (output, encoded item, its ``zlib.crc32``) durably; fires,
        never fails, once every append has committed or failed (counted as
        shed).

        The caller computes the crc, in its own thread: one kept copy goes
        to every output listing its set with one crc, and zlib lets the GIL
        go for more than 5 KiB, which in the reactor thread hands the GIL to
        a filter worker for up to a switch interval, once per message."""
        ...
