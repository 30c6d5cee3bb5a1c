"""The ``spamtrap`` command: tools around the daemon (which runs under twistd).

Each subcommand is one ``add_*`` function that declares its arguments and one
function that runs it and returns the exit code, so new commands (``explain``,
``pull``, ``stats``) slot in beside ``check-config`` without touching the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from spamtrap import __version__
from spamtrap.config import Config, ConfigError, load_config


def check_config(args: argparse.Namespace) -> int:
    """Load FILE strictly; print OK and a summary, or every error with its line."""
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        for issue in e.errors:
            print(issue.format(args.file), file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    print(f"  {summary(cfg)}")
    return 0


def summary(cfg: Config) -> str:
    """One line on what a config traps and where it goes."""
    t = cfg.traps
    traps = [
        _count(len(t.domains), "domain"),
        _count(len(t.addresses), "address", "addresses"),
        _count(len(t.patterns), "pattern"),
    ]
    if t.catch_all:
        traps.append("catch-all")
    sets = ", ".join(s.name + (f" ({s.shards} shards)" if s.shards > 1 else "") for s in cfg.sets)
    return f"traps: {', '.join(traps)}; feeds: {len(cfg.feeds)}; sets: {sets}"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def add_check_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "check-config",
        help="check a config file and list every error",
        description="Check a spamtrap YAML config. Exit 0 if it is valid; otherwise print "
        "every error as FILE:LINE: key: message and exit 1.",
    )
    p.add_argument("file", metavar="FILE", help="the YAML config, e.g. /etc/spamtrap/spamtrap.yaml")
    p.set_defaults(run=check_config)


def explain(args: argparse.Namespace) -> int:
    """Run messages through the configured stages and show every decision."""
    # Imported here: check-config should not pay for Twisted's start-up.
    from spamtrap.cli.explain import run

    return run(args)


def add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "explain",
        help="show what the stages do with messages, and the sets they land in",
        description="Run each MESSAGE file through the configured filter stages with the "
        "daemon's own code, and show every stage's verdict, the final keep or discard with its "
        "stage and reason, any extracted messages and the sets each lands in. Exit 0 on "
        "success, 1 if a file could not be read, 2 on usage or config errors. The output is "
        "described in docs/stages.md.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--rcpt",
        metavar="ADDR",
        action="append",
        default=[],
        help="an envelope recipient (repeatable; default: the To: addresses)",
    )
    p.add_argument("--feed", metavar="ID", help="treat the messages as arriving through feed ID")
    p.add_argument(
        "--meta",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="add a metadata value, e.g. helo=[192.0.2.1] (repeatable)",
    )
    p.add_argument("files", metavar="MESSAGE", nargs="+", help="a message file (.eml)")
    p.set_defaults(run=explain)


def pull(args: argparse.Namespace) -> int:
    """Follow sets: download, verify and optionally unpack their new bundles."""
    from spamtrap.cli.pull import run

    return run(args)


def add_pull(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from spamtrap.cli.pull import add_arguments

    p = commands.add_parser(
        "pull",
        help="download a set's new bundles, verify their sha256, resume where it stopped",
        description="Follow one or more sets through a spamtrap node's HTTP feed (--http), "
        "the sets' list notices in a maildir or mbox (--mail) or the S3 bucket (--s3). "
        "Every new bundle is downloaded to DIR/<set>/, resumed if interrupted, checked "
        "against its manifest's size and sha256, and recorded in a state file. Exit 0 if all "
        "went well, 1 if a bundle or listing failed (the others are still done), 2 on usage "
        "errors. See docs/pull.md.",
    )
    add_arguments(p)
    p.set_defaults(run=pull)


def stats(args: argparse.Namespace) -> int:
    """Count what the bundle indexes say, per hour or day."""
    from spamtrap.cli.stats import run

    return run(args)


def add_stats(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from spamtrap.cli.stats import add_arguments

    p = commands.add_parser(
        "stats",
        help="top campaigns, dialects, HELOs and peers per hour or day, from bundle indexes",
        description="Read the bundle indexes of a local store, a `spamtrap pull` directory or "
        "a node's set listing (http://node:8025/bundles/SET/, with the set's token) and print, "
        "per hour or day, the messages and the top campaigns, SMTP dialects, HELO names and "
        "peers with their counts. Exit 0 if all went well, 1 if an index or listing could not "
        "be read (the rest is still counted), 2 on usage errors or a missing directory. See "
        "docs/indexes.md.",
    )
    add_arguments(p)
    p.set_defaults(run=stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamtrap",
        description="Tools for spamtrap. The daemon itself runs as `twistd spamtrap`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_check_config(commands)
    add_explain(commands)
    add_pull(commands)
    add_stats(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits for --help, --version and usage errors; callers of
        # main() (tests, the console script) want the code, not the exit.
        return e.code if isinstance(e.code, int) else 1 if e.code else 0
    run = getattr(args, "run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        code: int = run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `spamtrap check-config ... | head`: the reader is gone, which is
        # not an error worth a traceback. Python would flush stdout again at
        # exit and complain, so point it at /dev/null; exit as a program
        # killed by SIGPIPE would (128 + 13), for `set -o pipefail`.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    return code


EXIT_BROKEN_PIPE = 141


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
