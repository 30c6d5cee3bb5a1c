"""The keys every per-message output has (``outputs:``, docs/outputs.md).

Declared like the rest of spamtrap.config.schema, in a module of its own:
a kind's ``Settings`` (spamtrap/outputs/<type>.py) subclasses OutputConfig,
and the walker builds the class that an output's ``type`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spamtrap.config.rules import GIB, _duration, _integer, _name, _rate, _size, rule


def output_kind(kind: str) -> type:
    """The Settings class of ``type: <kind>``; raises ValueError."""
    # Imported here: a kind's module imports this one for OutputConfig.
    from spamtrap.outputs import settings_class

    return settings_class(kind)


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """The keys every output has (docs/outputs.md). A kind's ``Settings``
    subclasses this one (also ``@dataclass(frozen=True, kw_only=True)``)
    and declares its own keys the same way; the walker builds the class
    that ``type`` names (spamtrap/outputs/<type>.py)."""

    name: str
    # The kind: exec, pyzor or forward.
    type: str = field(metadata=rule(_name))
    # The sets whose kept messages go to this output (a set that redacts
    # hands over its redacted copy). A private set's messages reach only
    # the outputs that list it.
    sets: list[str] = field(metadata=rule(_name, one_or_many=True, nonempty=True))
    # The output's own durable queue, DATA/outputs/<name>/: beyond any of
    # these bounds the oldest entries are shed (counted).
    max_messages: int = field(default=100_000, metadata=rule(_integer(1)))
    max_bytes: int = field(default=1 * GIB, metadata=rule(_size()))
    max_age: float = field(default=86400.0, metadata=rule(_duration(positive=True)))
    # A temporary failure is retried after retry_initial seconds, doubling
    # up to retry_max, each wait with jitter (+-20%).
    retry_initial: float = field(default=5.0, metadata=rule(_duration(positive=True)))
    retry_max: float = field(default=600.0, metadata=rule(_duration(positive=True)))
    # Messages per second sent at most (a token bucket holding one second's
    # worth, at least one message). 0 = unlimited.
    rate: float = field(default=0.0, metadata=rule(_rate))
    # Sends in flight at once.
    concurrency: int = field(default=4, metadata=rule(_integer(1)))

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) pairs for what no single key's rule can see; each
        is reported at its key's line. A kind overrides this to add its own
        (extending super().problems())."""
        if self.retry_initial > self.retry_max:
            return [("retry_initial", f"must not be above retry_max ({self.retry_max:g}s)")]
        return []
