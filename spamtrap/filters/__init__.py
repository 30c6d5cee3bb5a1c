"""Filter stages: the interface every stage implements, and the runner.

A stage is a callable taking an :class:`~spamtrap.message.Envelope` and
returning one of:

- ``None``: no objection, the message goes on to the next stage;
- :class:`Discard`: the message is dropped, with a reason (counted);
- :class:`Keep`: no objection, with a reason worth counting (e.g. "kept
  because clamd was down");
- :class:`Replace`: the message becomes these messages (rfc822 extraction);
  each goes on through the *later* stages on its own;
- :class:`Route`: the message goes on, and also lands in these sets (or
  only in them, with ``only=True``), whatever the set rules say.

A stage may add metadata with ``env.meta.setdefault("x_name", []).append(v)``:
names starting with ``x_`` are the operator's own (they become
``X-Spamtrap-X-Name`` fields and can be used in set rules as ``meta: x_name``).

Stages run in the filter thread pool, never in the reactor, so they may do
CPU work and blocking calls; one that talks to a network service uses a
Twisted client through ``blockingCallFromThread``. A stage must bound its
own work (parts, depth, bytes, a timeout); the runner also measures each
stage against ``filters.stage_budget`` and records an overrun.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spamtrap.message import Envelope


@dataclass(frozen=True)
class Discard:
    reason: str


@dataclass(frozen=True)
class Keep:
    reason: str


@dataclass(frozen=True)
class Replace:
    messages: list[Envelope]
    reason: str = "replaced"


@dataclass(frozen=True)
class Route:
    sets: list[str]
    only: bool = False


Verdict = Discard | Keep | Replace | Route | None
Stage = Callable[[Envelope], Verdict]


@dataclass
class StageVerdict:
    stage: str
    verdict: str  # "pass", "discard", "replace", "route" or "error"
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Outcome:
    """What the stages decided for one incoming message."""

    keep: bool
    stage: str = ""  # the stage that decided a discard
    reason: str = ""
    verdicts: list[StageVerdict] = field(default_factory=list)
    # The messages that go on to the sets: the original, or what replaced it,
    # each with the sets stages routed it to.
    survivors: list[tuple[Envelope, Route | None]] = field(default_factory=list)


def run_stages(
    stages: Sequence[tuple[str, Stage]],
    env: Envelope,
    budget: float = float("inf"),
    max_messages: int = 1000,
) -> Outcome:
    """Run stages in order.

    A stage that raises does not lose the message: the error is its verdict,
    and the message goes on to the next stage (nothing accepted is lost).
    """
    verdicts: list[StageVerdict] = []
    # Work list of (message, index of the next stage, route so far).
    work: list[tuple[Envelope, int, Route | None]] = [(env, 0, None)]
    survivors: list[tuple[Envelope, Route | None]] = []
    discards: list[StageVerdict] = []
    while work:
        msg, i, route = work.pop(0)
        if i == len(stages):
            survivors.append((msg, route))
            continue
        name, stage = stages[i]
        started = time.monotonic()
        try:
            result = stage(msg)
        except Exception as e:  # noqa: BLE001 - a buggy stage must not lose mail
            verdicts.append(StageVerdict(name, "error", type(e).__name__))
            work.insert(0, (msg, i + 1, route))
            continue
        took = time.monotonic() - started
        if took > budget:
            verdicts.append(StageVerdict(name, "error", "over-budget", took))
            work.insert(0, (msg, i + 1, route))
            continue
        if result is None or isinstance(result, Keep):
            reason = result.reason if result is not None else ""
            verdicts.append(StageVerdict(name, "pass", reason, took))
            work.insert(0, (msg, i + 1, route))
        elif isinstance(result, Discard):
            v = StageVerdict(name, "discard", result.reason, took)
            verdicts.append(v)
            discards.append(v)
        elif isinstance(result, Replace):
            verdicts.append(StageVerdict(name, "replace", result.reason, took))
            room = max_messages - len(work) - len(survivors)
            work[0:0] = [(m, i + 1, route) for m in result.messages[: max(room, 0)]]
        else:
            verdicts.append(StageVerdict(name, "route", ",".join(result.sets), took))
            merged = result if route is None or result.only else Route(
                [*route.sets, *result.sets], route.only
            )
            work.insert(0, (msg, i + 1, merged))
    if survivors:
        return Outcome(True, verdicts=verdicts, survivors=survivors)
    first = discards[0] if discards else StageVerdict("", "discard", "nothing left")
    return Outcome(False, first.stage, first.reason, verdicts)
