"""Refuse operators' regexps whose backtracking can blow up.

Python's ``re`` backtracks, and holds the GIL for a whole search: one
pattern like ``(a+)+$`` searched in a hostile header can stall every
thread of the daemon, SMTP included, for seconds or forever. Operator
regexps (discard-list rules, set conditions, feeds' ``strip_headers``,
trap patterns) are therefore checked when they are loaded, by walking the
parse tree ``re._parser`` gives, and two shapes are refused:

- **ambiguous repetition**: a group repeated without bound (or more than
  once) whose body can match the same text in more than one way when
  repeated: a quantifier inside it that can run into the next iteration's
  (``(a+)+``, ``(.*)*``, ``(\\s*x?)*``, ``(a*b*)*``), or alternatives that
  can start with the same character (``(a|a)*``, ``(a|ab)+``).
  ``(?:[a-z0-9-]+\\.)+`` is fine: the ``\\.`` ends every iteration;
- **adjacent overlapping quantifiers**: two unbounded quantifiers with
  nothing required between them that both can match the same character
  (``\\s*\\s*``, ``.*.*=``, ``\\w+\\d*\\w+``). ``.*foo.*`` and ``\\w+@\\w+``
  are fine.

Possessive quantifiers (``a++``) and atomic groups (``(?>...)``) never
backtrack into themselves, so they are accepted anywhere.

What is left is at most quadratic in the length of the text searched (an
unanchored ``\\w+@`` on a long run of letters): the callers bound that
length (see docs/stages.md).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

# sre_parse and sre_constants, under the names Python 3.11 gave them.
_p: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

# An operator's regexp sees at most this much of each value it searches.
# What is accepted is at most quadratic (an unanchored "\w+@" on a run of
# letters), so the cut keeps one search under a few milliseconds whatever
# the message holds. RFC 5322 2.1.1 lines are at most 998 characters; a To
# of 100 addresses fits too; a quadratic regexp costs at most ~15 ms on one.
MAX_VALUE_CHARS = 2048

# Characters are modelled as 0..255 and one stand-in for everything above.
_OTHER = 256
_ALL = frozenset(range(257))
_MAXREPEAT = _c.MAXREPEAT

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT}


def _category(cat: Any) -> frozenset[int]:
    c = _c
    tests = {
        c.CATEGORY_DIGIT: lambda ch: chr(ch).isdigit() and ch < 128,
        c.CATEGORY_SPACE: lambda ch: chr(ch).isspace(),
        c.CATEGORY_WORD: lambda ch: chr(ch).isalnum() or ch == 0x5F,
    }
    negated = {
        c.CATEGORY_NOT_DIGIT: c.CATEGORY_DIGIT,
        c.CATEGORY_NOT_SPACE: c.CATEGORY_SPACE,
        c.CATEGORY_NOT_WORD: c.CATEGORY_WORD,
    }
    if cat in tests:
        chars = {ch for ch in range(256) if tests[cat](ch)}
        if cat == c.CATEGORY_WORD:
            chars.add(_OTHER)
        return frozenset(chars)
    if cat in negated:
        return _ALL - _category(negated[cat])
    return _ALL  # line-break categories and the like: assume anything


def _cased(ch: int) -> set[int]:
    if ch >= 256:
        return {_OTHER}
    s = chr(ch)
    return {ch, *(ord(x) for x in (s.lower(), s.upper()) if len(x) == 1 and ord(x) < 256)}


def _chars(op: Any, av: Any) -> frozenset[int] | None:
    """The characters a one-character item can match; None if not one."""
    if op is _c.LITERAL:
        return frozenset(_cased(av))
    if op is _c.NOT_LITERAL:
        return _ALL - frozenset(_cased(av))
    if op is _c.ANY:
        return _ALL
    if op is _c.IN:
        chars: set[int] = set()
        negate = False
        for iop, iav in av:
            if iop is _c.NEGATE:
                negate = True
            elif iop is _c.LITERAL:
                chars |= _cased(iav)
            elif iop is _c.RANGE:
                lo, hi = iav
                for ch in range(lo, min(hi, 255) + 1):
                    chars |= _cased(ch)
                if hi > 255:
                    chars.add(_OTHER)
            elif iop is _c.CATEGORY:
                chars |= _category(iav)
            else:
                chars = set(_ALL)
        return _ALL - frozenset(chars) if negate else frozenset(chars)
    return None


class UnsafePatternError(ValueError):
    """A regexp with a catastrophic shape; the message names the sub-pattern."""


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str, item: Any) -> None:
        raise UnsafePatternError(f"{what}: {_render(item)}")

    # -- facts about items ---------------------------------------------------

    def nullable(self, item: Any) -> bool:
        op, av = item
        if op in _REPEATS or op is _c.POSSESSIVE_REPEAT:
            return av[0] == 0 or self.seq_nullable(av[2])
        if op is _c.SUBPATTERN:
            return self.seq_nullable(av[3])
        if op is _c.ATOMIC_GROUP:
            return self.seq_nullable(av)
        if op is _c.BRANCH:
            return any(self.seq_nullable(b) for b in av[1])
        if op is _c.GROUPREF_EXISTS:
            return True
        return op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT, _c.GROUPREF)

    def seq_nullable(self, seq: Any) -> bool:
        return all(self.nullable(i) for i in seq)

    def first(self, seq: Any) -> frozenset[int]:
        """Characters a match of ``seq`` can start with."""
        out: set[int] = set()
        for item in seq:
            out |= self.item_first(item)
            if not self.nullable(item):
                break
        return frozenset(out)

    def item_first(self, item: Any) -> frozenset[int]:
        op, av = item
        chars = _chars(op, av)
        if chars is not None:
            return chars
        if op in _REPEATS or op is _c.POSSESSIVE_REPEAT:
            return self.first(av[2])
        if op is _c.SUBPATTERN:
            return self.first(av[3])
        if op is _c.ATOMIC_GROUP:
            return self.first(av)
        if op is _c.BRANCH:
            return frozenset().union(*(self.first(b) for b in av[1]))
        if op is _c.GROUPREF or op is _c.GROUPREF_EXISTS:
            return _ALL
        return frozenset()

    def ends(self, item: Any, at_start: bool) -> list[tuple[frozenset[int], Any]]:
        """The unbounded backtracking quantifiers that can begin (``at_start``)
        or end a match of ``item``, with their characters."""
        op, av = item
        if op in _REPEATS:
            lo, hi, body = av
            chars = _one_char(body)
            if chars is not None:
                return [(chars, item)] if hi == _MAXREPEAT else []
            return self.seq_ends(body, at_start)
        if op is _c.SUBPATTERN:
            return self.seq_ends(av[3], at_start)
        if op is _c.BRANCH:
            return [e for b in av[1] for e in self.seq_ends(b, at_start)]
        return []  # possessive and atomic: no backtracking into them

    def seq_ends(self, seq: Any, at_start: bool) -> list[tuple[frozenset[int], Any]]:
        out = []
        for item in seq if at_start else reversed(seq):
            out += self.ends(item, at_start)
            if not self.nullable(item):
                break
        return out

    # -- the checks ------------------------------------------------------------

    def sequence(self, seq: Any) -> None:
        """Check a sequence and everything in it."""
        open_ends: list[tuple[frozenset[int], Any]] = []
        for item in seq:
            self.item(item)
            for chars, head in self.ends(item, at_start=True):
                for tail_chars, tail in open_ends:
                    if chars & tail_chars and head is not tail:
                        self.fail(
                            "adjacent quantifiers that can match the same text",
                            [tail, head] if tail is not head else [tail],
                        )
            tails = self.ends(item, at_start=False)
            open_ends = open_ends + tails if self.nullable(item) else tails

    def item(self, item: Any) -> None:
        op, av = item
        if op in _REPEATS or op is _c.POSSESSIVE_REPEAT:
            lo, hi, body = av
            self.sequence(body)
            if op in _REPEATS and hi > 1 and _one_char(body) is None:
                self.repeated(item, body)
        elif op is _c.SUBPATTERN:
            self.sequence(av[3])
        elif op is _c.ATOMIC_GROUP:
            self.sequence(av)
        elif op is _c.BRANCH:
            for b in av[1]:
                self.sequence(b)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            self.sequence(av[1])
        elif op is _c.GROUPREF_EXISTS:
            for b in av[1:]:
                if b is not None:
                    self.sequence(b)

    def repeated(self, item: Any, body: Any) -> None:
        """A group repeated more than once: its iterations must not be able
        to split the same text in several ways."""
        self.absorb(item, body, self.first(body))
        if self.seq_nullable(body) and self.first(body):
            self.fail("a repeated group that can match empty text", [item])

    def absorb(self, whole: Any, seq: Any, after: frozenset[int]) -> None:
        """Fail if a quantifier in ``seq`` can take characters that what
        follows it (in ``seq``, then ``after``) could start with: then the
        iterations of ``whole`` can split the same text in several ways."""
        items = list(seq)
        for i, (op, av) in enumerate(items):
            rest = items[i + 1 :]
            follow = self.first(rest)
            if self.seq_nullable(rest):
                follow |= after
            if op in _REPEATS and av[1] > 1:
                if self.first(av[2]) & follow:
                    self.fail("a repeated group whose iterations can overlap", [whole])
            elif op is _c.SUBPATTERN:
                self.absorb(whole, av[3], follow)
            elif op is _c.BRANCH:
                # Alternatives that can start alike: each iteration can take either.
                alts = av[1]
                firsts = [self.first(alt) for alt in alts]
                nullables = [self.seq_nullable(alt) for alt in alts]
                for x in range(len(alts)):
                    for y in range(x + 1, len(alts)):
                        if firsts[x] & firsts[y] or (nullables[x] and nullables[y]):
                            self.fail("a repeated group whose alternatives overlap", [whole])
                for alt in alts:
                    self.absorb(whole, alt, follow)


def _one_char(body: Any) -> frozenset[int] | None:
    items = list(body)
    if len(items) != 1:
        return None
    return _chars(*items[0])


def _render(items: Any) -> str:
    """A readable (re-parsable for simple cases) rendering of parse items."""
    return "".join(_render_item(op, av) for op, av in items)


_CATS = {
    "CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W",
}


def _render_item(op: Any, av: Any) -> str:
    if op is _c.LITERAL:
        return re.escape(chr(av))
    if op is _c.NOT_LITERAL:
        return "[^" + re.escape(chr(av)) + "]"
    if op is _c.ANY:
        return "."
    if op is _c.IN:
        if len(av) == 1 and av[0][0] is _c.CATEGORY:
            return _CATS.get(str(av[0][1]), "[...]")
        inner = ""
        for iop, iav in av:
            if iop is _c.NEGATE:
                inner += "^"
            elif iop is _c.LITERAL:
                inner += re.escape(chr(iav))
            elif iop is _c.RANGE:
                inner += f"{re.escape(chr(iav[0]))}-{re.escape(chr(iav[1]))}"
            elif iop is _c.CATEGORY:
                inner += _CATS.get(str(iav), "")
        return f"[{inner}]"
    if op in _REPEATS or op is _c.POSSESSIVE_REPEAT:
        lo, hi, body = av
        inner = _render(body)
        if len(list(body)) != 1 or _one_char(body) is None:
            if not (len(list(body)) == 1 and list(body)[0][0] is _c.SUBPATTERN):
                inner = f"(?:{inner})"
        q = {(0, _MAXREPEAT): "*", (1, _MAXREPEAT): "+", (0, 1): "?"}.get(
            (lo, hi), f"{{{lo},{'' if hi == _MAXREPEAT else hi}}}"
        )
        if op is _c.MIN_REPEAT:
            q += "?"
        elif op is _c.POSSESSIVE_REPEAT:
            q += "+"
        return inner + q
    if op is _c.SUBPATTERN:
        return f"({_render(av[3])})"
    if op is _c.ATOMIC_GROUP:
        return f"(?>{_render(av)})"
    if op is _c.BRANCH:
        return "|".join(_render(b) for b in av[1])
    if op is _c.AT:
        return {"AT_BEGINNING": "^", "AT_END": "$", "AT_BOUNDARY": r"\b"}.get(str(av), "")
    return "..."


def check(pattern: str, flags: int = 0) -> None:
    """Raise UnsafePatternError if ``pattern`` has a catastrophic shape.

    re.error for a pattern that does not parse at all.
    """
    tree = _p.parse(pattern, flags)
    _Checker(pattern).sequence(tree)


def compile_safe(pattern: str, flags: int = re.IGNORECASE) -> re.Pattern[str]:
    """``re.compile`` for operator regexps: also refuses catastrophic shapes
    (UnsafePatternError, a ValueError, naming the offending sub-pattern)."""
    compiled = re.compile(pattern, flags)
    check(pattern, flags)
    return compiled
