"""Filter stages: the interface every stage implements, and the runner.

A stage is a callable taking an :class:`~spamtrap.message.Envelope` and
returning None (no objection: the message goes on) or a :class:`Discard`.
Stages run in the filter thread pool, never in the reactor, so they may do
CPU work; they must not keep state across messages without a lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spamtrap.message import Envelope


@dataclass(frozen=True)
class Discard:
    reason: str


Stage = Callable[[Envelope], Discard | None]


@dataclass
class StageVerdict:
    stage: str
    verdict: str  # "pass", "discard" or "error"
    reason: str = ""


@dataclass
class Outcome:
    keep: bool
    stage: str = ""  # the stage that decided a discard
    reason: str = ""
    verdicts: list[StageVerdict] = field(default_factory=list)


def run_stages(stages: Sequence[tuple[str, Stage]], env: Envelope) -> Outcome:
    """Run stages in order until one discards.

    A stage that raises does not lose the message: the error is its verdict,
    and the message goes on to the next stage (nothing accepted is lost).
    """
    verdicts: list[StageVerdict] = []
    for name, stage in stages:
        try:
            result = stage(env)
        except Exception as e:  # noqa: BLE001 - a buggy stage must not lose mail
            verdicts.append(StageVerdict(name, "error", f"{type(e).__name__}: {e}"))
            continue
        if result is not None:
            verdicts.append(StageVerdict(name, "discard", result.reason))
            return Outcome(False, name, result.reason, verdicts)
        verdicts.append(StageVerdict(name, "pass"))
    return Outcome(True, verdicts=verdicts)
