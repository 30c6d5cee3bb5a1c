"""``spamtrap explain``: what the daemon would do with a message, and why.

Each file is made into an Envelope and decided by the daemon's own code:
the stages come from ``spamtrap.filters.registry.build_stages`` and the
decision from ``spamtrap.work.pipeline.evaluate``, run in a thread while the
reactor runs (network stages such as clamd and spamd need it), just as the
workers do. The only addition is an observer around each stage that notes
which message it was called with, so each verdict can be shown under the
message it belongs to (extracted messages have their own). With ``--feed``
the feeds stage also hands over its strip plan (FeedStage.observer), so the
header block it leaves can be shown with the removed fields marked.

The output is documented in docs/stages.md ("explain output").
"""

from __future__ import annotations

import argparse
import email.utils
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.task import react
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import ILogObserver, LogLevel, eventAsText, globalLogPublisher
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool
from zope.interface import provider

from spamtrap import mime
from spamtrap.config import Config, ConfigError, default_config, load_config
from spamtrap.filters import Stage, StageVerdict
from spamtrap.filters.feeds import FeedStage, FieldDecision
from spamtrap.message import META_FIELDS, Envelope, iso_time
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import evaluate

FORMAT = 1
_OWN_META = re.compile(r"x_[a-z0-9_]+")


class UsageError(Exception):
    pass


# -- the message --------------------------------------------------------------


@dataclass
class Options:
    rcpts: list[str]
    feed: str | None
    meta: list[tuple[str, str]]


def envelope_from_bytes(data: bytes, msg_id: str, options: Options, now: float) -> Envelope:
    """An Envelope as SMTP would have made it, from a message file.

    - a leading mbox ``From `` line (files cut out of an mbox) is dropped;
    - mail_from: the first Return-Path's address, else "" (the null sender);
    - rcpts: ``--rcpt`` addresses, else the addresses in To:;
    - metadata: id, mail_from, rcpt, domain, feed, received, size, and
      whatever ``--meta NAME=VALUE`` adds. No peer, HELO or TLS facts:
      give them with --meta when a rule needs them.
    """
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        data = data[nl + 1 :] if nl >= 0 else b""
    head, _ = mime.split_message(data)
    fields = mime.header_fields(head)
    return_path = next((v for n, v in fields if n == "return-path"), "")
    mail_from = return_path.strip().strip("<>").strip()
    rcpts = list(options.rcpts)
    if not rcpts:
        to = [v for n, v in fields if n == "to"]
        rcpts = [addr for _, addr in email.utils.getaddresses(to) if "@" in addr]
    meta: dict[str, list[str]] = {
        "id": [msg_id],
        "mail_from": [f"<{mail_from}>"],
        "rcpt": [f"<{r}>" for r in rcpts],
    }
    domains = list(dict.fromkeys(r.rpartition("@")[2].lower() for r in rcpts))
    if domains:
        meta["domain"] = domains
    if options.feed:
        meta["feed"] = [options.feed]
    meta["received"] = [iso_time(now)]
    meta["size"] = [str(len(data))]
    for name, value in options.meta:
        meta.setdefault(name, []).append(value)
    return Envelope(msg_id, now, mail_from, rcpts, data, feed=options.feed, meta=meta)


# -- the decision, in a worker thread -----------------------------------------


def _observed(stages: Sequence[tuple[str, Stage]], seen: list[Envelope]) -> list[tuple[str, Stage]]:
    # run_stages appends exactly one verdict per stage call, in call order:
    # noting the message of each call pairs every verdict with its message.
    def observe(stage: Stage) -> Stage:
        def observed(env: Envelope) -> Any:
            seen.append(env)
            return stage(env)

        return observed

    return [(name, observe(stage)) for name, stage in stages]


def _verdicts(verdicts: list[StageVerdict]) -> list[dict[str, Any]]:
    return [
        {"stage": v.stage, "verdict": v.verdict, "reason": v.reason, "seconds": round(v.seconds, 6)}
        for v in verdicts
    ]


def _own_meta(env: Envelope) -> dict[str, list[str]]:
    meta = {k: list(v) for k, v in sorted(env.meta.items()) if k.startswith("x_")}
    # As the stored header block would carry it: computed on the bytes this
    # message has after the stages (feed stripping, extraction).
    if env.spoofed is not None:
        meta["spoofed"] = [env.spoofed]
    return meta


# id(message) -> (its bytes as the feeds stage got them, the strip plan)
Plans = dict[int, tuple[bytes, list[FieldDecision]]]

_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _field_text(data: bytes) -> str:
    """A header field as text, without its final line end."""
    return data.decode("utf-8", "replace").rstrip("\r\n")


def header_report(data: bytes, plan: list[FieldDecision]) -> list[dict[str, Any]]:
    """The top header fields as the feeds stage got them, each with the
    config key that removes it (``stripped``; None: it stays)."""
    return [
        {"name": d.name, "text": _field_text(data[d.start : d.end]), "stripped": d.rule}
        for d in plan
    ]


def explain_envelope(
    stages: Sequence[tuple[str, Stage]],
    collator: Collator,
    env: Envelope,
    plans: Plans | None = None,
) -> dict[str, Any]:
    """The report for one message (without its "file"). Blocking: run it in
    a worker thread, as the daemon runs evaluate().

    With ``plans`` (filled by the feeds stage's observer while this runs)
    every message's report has "header": its header fields with what the
    feeds stage removed, or None if that stage did not strip it.
    """
    seen: list[Envelope] = []
    result = evaluate(_observed(stages, seen), collator, env)
    outcome = result.outcome
    deliveries = result.deliveries
    sets_of = {id(m): sets for m, sets in deliveries}
    by_message: dict[int, list[StageVerdict]] = {}
    messages: list[Envelope] = [env]
    for msg, verdict in zip(seen, outcome.verdicts, strict=True):
        if id(msg) not in by_message and msg is not env:
            messages.append(msg)
        by_message.setdefault(id(msg), []).append(verdict)
    # Messages made by the last stage(s) meet no stage after them.
    listed = {id(m) for m in messages}
    messages += [m for m, _ in deliveries if id(m) not in listed]

    def report(msg: Envelope) -> dict[str, Any]:
        verdicts = by_message.get(id(msg), [])
        final = next((v for v in verdicts if v.verdict in ("discard", "replace")), None)
        if id(msg) in sets_of:
            verdict, stage, reason = "keep", None, None
        elif final is not None:
            verdict, stage, reason = final.verdict, final.stage, final.reason
        else:
            verdict, stage, reason = "discard", None, "not processed"
        out = {
            "id": msg.msg_id,
            "verdict": verdict,
            "stage": stage,
            "reason": reason,
            "stages": _verdicts(verdicts),
            "sets": sets_of.get(id(msg), []),
            "meta": _own_meta(msg),
        }
        if plans is not None:
            planned = plans.get(id(msg))
            out["header"] = header_report(*planned) if planned else None
        return out

    top = report(env)
    all_sets = {s for _, sets in deliveries for s in sets}
    top.update(
        verdict="keep" if outcome.keep else "discard",
        stage=None if outcome.keep else outcome.stage or None,
        reason=None if outcome.keep else outcome.reason,
        sets=[s.name for s in collator.sets if s.name in all_sets],
        extracted=[report(m) for m in messages[1:]],
    )
    return top


# -- the command --------------------------------------------------------------


def parse_options(cfg: Config, args: argparse.Namespace) -> Options:
    feeds = [f.id for f in cfg.feeds]
    if args.feed is not None and args.feed not in feeds:
        known = ", ".join(feeds) or "none in this config"
        raise UsageError(f"--feed {args.feed}: not a configured feed (feeds: {known})")
    meta = []
    for item in args.meta:
        name, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--meta {item}: expected NAME=VALUE")
        if name not in META_FIELDS and not _OWN_META.fullmatch(name):
            raise UsageError(
                f"--meta {item}: unknown metadata field {name!r} (known: "
                f"{', '.join(META_FIELDS)}, or x_...)"
            )
        meta.append((name, value))
    return Options(list(args.rcpt), args.feed, meta)


def run(args: argparse.Namespace) -> int:
    """The ``explain`` subcommand; the exit code."""
    try:
        cfg = load_config(args.config) if args.config else default_config()
        options = parse_options(cfg, args)
    except ConfigError as e:
        for issue in e.errors:
            print(issue.format(args.config), file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"spamtrap explain: {e}", file=sys.stderr)
        return 2

    def main(reactor: Any) -> defer.Deferred[None]:
        d = defer.ensureDeferred(explain_files(reactor, cfg, args.files, options, args.json))

        def done(code: int) -> None:
            if code:
                raise SystemExit(code)

        return d.addCallback(done)

    # Stages log through twisted.logger; show their warnings and errors.
    globalLogPublisher.addObserver(_log_to_stderr)
    try:
        return _with_reactor(main)
    finally:
        globalLogPublisher.removeObserver(_log_to_stderr)


def _with_reactor(main: Callable[[Any], defer.Deferred[None]]) -> int:
    """Run ``main(reactor)`` to its end; the exit code.

    On the command line that is task.react. Called from a thread of a
    program whose reactor already runs (a test, or a tool embedding this),
    main runs on that reactor instead, and this thread waits for it.
    """
    from twisted.internet import reactor

    try:
        if not getattr(reactor, "running", False):
            react(main)
        if isInIOThread():
            raise RuntimeError("spamtrap explain would block the running reactor's thread")
        blockingCallFromThread(reactor, cast(Any, main), reactor)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


_SHOWN_LEVELS = {LogLevel.warn, LogLevel.error, LogLevel.critical}


@provider(ILogObserver)
def _log_to_stderr(event: dict[str, Any]) -> None:
    if event.get("log_level") in _SHOWN_LEVELS:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        print(f"spamtrap explain: {text}", file=sys.stderr)


async def explain_files(
    reactor: Any, cfg: Config, paths: Sequence[str], options: Options, as_json: bool
) -> int:
    """Explain every file, print the reports; the exit code."""
    from spamtrap.filters import lists
    from spamtrap.filters.custom import StageLoadError
    from spamtrap.filters.registry import build_stages

    try:
        stages = build_stages(cfg, reactor)
    except StageLoadError as e:
        print(f"spamtrap explain: {e}", file=sys.stderr)
        return 2
    lists_stage = lists.find(stages)
    if lists_stage is not None:
        lists_stage.reload()  # its files; a bad one is logged, as the daemon does
    collator = Collator(cfg.sets)
    pool = ThreadPool(minthreads=1, maxthreads=1, name="spamtrap-explain")
    pool.start()
    reports: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    now = time.time()
    feed_stage = next((s for _, s in stages if isinstance(s, FeedStage)), None)
    if options.feed is not None and feed_stage is None:
        print(
            f"spamtrap explain: --feed {options.feed}: the feeds stage is not in"
            " filters.order, so nothing is stripped",
            file=sys.stderr,
        )
    try:
        for i, path in enumerate(paths, 1):
            work = _file_work(
                path, f"explain-{i}", stages, collator, options, now, feed_stage, options.feed
            )
            report, error = await deferToThreadPool(reactor, pool, work)
            if error is not None:
                print(f"spamtrap explain: {path}: {error}", file=sys.stderr)
                errors.append({"file": path, "error": error})
            else:
                assert report is not None
                reports.append(report)
                if not as_json:
                    print(format_report(report))
    finally:
        pool.stop()
    if as_json:
        doc: dict[str, Any] = {"format": FORMAT, "messages": reports}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    return 1 if errors else 0


def _file_work(
    path: str,
    msg_id: str,
    stages: Sequence[tuple[str, Stage]],
    collator: Collator,
    options: Options,
    now: float,
    feed_stage: FeedStage | None = None,
    feed: str | None = None,
) -> Callable[[], tuple[dict[str, Any] | None, str | None]]:
    def work() -> tuple[dict[str, Any] | None, str | None]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"cannot read: {e.strerror or e}"
        env = envelope_from_bytes(data, msg_id, options, now)
        plans: Plans | None = None
        if feed is not None:
            plans = {}
            if feed_stage is not None:
                # One file at a time (the pool has one thread): this
                # file's messages only.
                found = plans

                def note(msg: Envelope, plan: list[FieldDecision]) -> None:
                    found[id(msg)] = (msg.data, plan)

                feed_stage.observer = note
        try:
            report = explain_envelope(stages, collator, env, plans)
        finally:
            if feed_stage is not None:
                feed_stage.observer = None
        if feed is not None:
            report["feed"] = feed
        return {"file": path, **report}, None

    return work


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of one file's report."""
    lines = [f"{report['file']}: {_summary(report)}"]
    lines += _details(report, "  ")
    feed = report.get("feed", "")
    lines += _header(report, "  ", feed)
    for sub in report["extracted"]:
        lines.append(f"  extracted {sub['id']}: {_summary(sub)}")
        lines += _details(sub, "    ")
        lines += _header(sub, "    ", feed)
    return "\n".join(lines)


def _header(r: dict[str, Any], indent: str, feed: str) -> list[str]:
    """The header block after the feed's stripping: every field as the
    feeds stage got it, removed ones marked "-" with the key that removes
    them. Control characters are shown escaped: spam must not drive the
    operator's terminal."""
    if r.get("header") is None:
        return []
    lines = [f"{indent}header after feed {feed} ('-' removed):"]
    for field in r["header"]:
        mark = "-" if field["stripped"] else " "
        for n, line in enumerate(re.split(r"\r?\n", field["text"])):
            shown = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", line)
            note = f"  [{field['stripped']}]" if n == 0 and field["stripped"] else ""
            lines.append(f"{indent}{mark} {shown}{note}")
    return lines


def _summary(r: dict[str, Any]) -> str:
    if r["verdict"] == "keep":
        return f"keep, sets: {', '.join(r['sets']) or '(none)'}"
    if r["verdict"] == "replace":
        return f"replaced by {r['stage']} ({r['reason']})"
    where = f" by {r['stage']}" if r["stage"] else ""
    return f"discard{where} ({r['reason']})"


def _details(r: dict[str, Any], indent: str) -> list[str]:
    width = max((len(v["stage"]) for v in r["stages"]), default=0)
    lines = [
        f"{indent}{v['stage']:<{width}}  {v['verdict']:<7}  {v['reason']}".rstrip()
        for v in r["stages"]
    ]
    for name, values in r["meta"].items():
        lines += [f"{indent}{name}: {value}" for value in values]
    return lines
