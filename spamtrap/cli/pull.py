"""``spamtrap pull``: follow sets, download their new bundles, verify, unpack.

A plain blocking program (no reactor): it lists each set at its source,
downloads every bundle it does not have yet into ``DEST/<set>/``, checks
size and sha256 against the bundle's manifest, and records it in a state
file. See docs/pull.md.

Sources (exactly one):

- ``--http URL``: a spamtrap node's feed, ``URL/feeds/<set>``, with the
  set's bearer token; pages are followed with the returned cursor.
- ``--mail PATH``: a maildir or mbox holding the set's list notices; each
  notice's body is ``Header: value`` lines (Set, Key, URL, SHA256, Size...).
  A notice of a followed set that cannot be followed (no URL, a URL that is
  not http(s), a malformed key, size or sha256) is an error naming the
  notice by its Message-ID, not a silent skip.
- ``--s3 s3://bucket/prefix``: the bucket itself, listed with credentials
  (botocore's standard chain), manifests first: a manifest is the commit
  marker of its bundle.

Bundle keys start with the time the bundle was opened, and a bundle is
stored up to a rotation period (or an outage) later, so a bundle can appear
behind a newer one. Listings therefore start ``--overlap`` seconds before
the newest key seen, and the state file's record of each key makes the
overlap cost nothing but the listing.

Unpacking (``--unpack``) is recorded per bundle and target in the state
file, so bundles an earlier run fetched without it are unpacked by the
first run that asks, once. ``--unpack maildir --wire`` writes each
message's wire bytes (as the SMTP client sent them) instead of the stored
form; see :func:`wire_bytes`.

Downloads go to ``DEST/<key>.part`` and resume with a Range request from
its size; a verified file is renamed into place. A bundle whose manifest
(or feed entry) names an index gets it too, beside it as
``<name>.index.jsonl``, checked against the manifest's ``index_sha256``
before the bundle counts as fetched; a bundle without one (stored before
indexes) is pulled as ever. Exit status: 0 when all
went well, 1 when something failed (the rest is still done), 2 on usage
errors.

This module is the command and the download loop; pull_remote holds what
sources list, pull_sources the sources, pull_state the state file,
pull_unpack the unpacking and pull_progress the progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import zlib
from typing import Any, TextIO

from spamtrap.cli.pull_progress import Progress, megabytes
from spamtrap.cli.pull_remote import PullError, Remote, ResumeRefusedError, Source, index_name
from spamtrap.cli.pull_sources import FeedSource, MailSource, S3Source
from spamtrap.cli.pull_state import State, locked, rewind
from spamtrap.cli.pull_unpack import Skipped, unpack_maildir, unpack_mbox
from spamtrap.message import wire_bytes
from spamtrap.store import fsync_dir, valid_set_name

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_OVERLAP = 86400.0
DEFAULT_TIMEOUT = 60.0
STATE_NAME = ".spamtrap-pull.json"
WIRE_DIR = "wire"  # DEST/<set>/wire/: a maildir of the messages' wire bytes
MAX_SKIPPED_REPORTED = 10  # per bundle; the rest are counted in one line


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: str, remote: Remote) -> bool:
    return os.path.getsize(path) == remote.size and _sha256_of(path) == remote.sha256


class Puller:
    def __init__(
        self,
        source: Source,
        dest: str,
        state: State,
        unpack: str | None,
        progress: Progress,
        overlap: float,
    ) -> None:
        self.source = source
        self.dest = dest
        self.state = state
        self.unpack = unpack
        self.progress = progress
        self.overlap = overlap
        self.failures = 0
        self.fetched = 0
        self.fetched_bytes = 0

    def fail(self, text: str) -> None:
        self.failures += 1
        self.progress.error(text)

    def run(self, sets: list[str]) -> None:
        self._catch_up_unpacking(sets)
        todo: list[Remote] = []
        listed: dict[str, list[Remote]] = {}
        for set_name in sets:
            try:
                since = rewind(self.state.cursors.get(set_name), self.overlap)
                remotes, problems = self.source.listing(set_name, since)
            except PullError as e:
                self.fail(str(e))
                continue
            for problem in problems:
                # A bundle fetched already (through a good notice, or by an
                # earlier run) needs nothing from a bad entry naming it.
                if problem.key is None or problem.key not in self.state.bundles:
                    self.fail(problem.text)
            listed[set_name] = remotes
            for remote in remotes:
                if remote.key in self.state.bundles:
                    continue
                if (remote.size is None or remote.sha256 is None) and not self._describe(remote):
                    continue
                todo.append(remote)
        failed: set[str] = set()
        self.progress.start(len(todo), sum(r.size or 0 for r in todo))
        for remote in todo:
            try:
                self._pull(remote)
            except PullError as e:
                failed.add(remote.key)
                self.fail(str(e))
            self.progress.done()
        for set_name, remotes in listed.items():
            self._advance_cursor(set_name, remotes, failed)
        self.state.save()

    def _describe(self, remote: Remote) -> bool:
        """Complete a remote's size and sha256 from its manifest."""
        try:
            manifest = self.source.manifest(remote)
        except PullError as e:
            self.fail(str(e))
            return False
        if remote.size is not None and remote.size != manifest.size:
            self.fail(f"{remote.key}: announced size {remote.size}, manifest says {manifest.size}")
            return False
        remote.size, remote.sha256 = manifest.size, manifest.sha256
        remote.index_sha256 = remote.index_sha256 or manifest.index_sha256
        return True

    def _advance_cursor(self, set_name: str, remotes: list[Remote], failed: set[str]) -> None:
        # Up to the first failure only: the next run lists from there again.
        cursor = self.state.cursors.get(set_name, "")
        for remote in remotes:  # oldest first
            if remote.key in failed or remote.key not in self.state.bundles:
                break
            cursor = max(cursor, remote.cursor)
        if cursor:
            self.state.cursors[set_name] = cursor

    def _paths(self, key: str) -> tuple[str, str]:
        final = os.path.join(self.dest, key)
        return final, final + ".part"

    def _pull(self, remote: Remote) -> None:
        final, part = self._paths(remote.key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.isfile(final) and _verified(final, remote):
            # Placed by an earlier run that stopped before saving the state.
            self.progress.skip_bytes(remote.size or 0)
        else:
            self._download(remote, part)
            os.replace(part, final)
            fsync_dir(os.path.dirname(final))
            self.fetched += 1
            self.fetched_bytes += remote.size or 0
        entry: dict[str, Any] = {"size": remote.size, "sha256": remote.sha256}
        if remote.index_sha256 is not None:
            self._pull_index(remote, final)
            entry["index_sha256"] = remote.index_sha256
        self.state.bundles[remote.key] = entry
        self.state.save()
        if self.unpack:
            self._unpack(remote.key, entry, self.unpack)

    def _pull_index(self, remote: Remote, final: str) -> None:
        """Fetch and verify the bundle's index beside it (unless a verified
        one is there already). Before the state records the bundle: a
        failure here makes the next run try again."""
        target = index_name(final)
        if os.path.isfile(target) and _sha256_of(target) == remote.index_sha256:
            return
        data = self.source.fetch_index(remote)
        if hashlib.sha256(data).hexdigest() != remote.index_sha256:
            raise PullError(
                f"{remote.key}: the index's sha256 does not match the manifest; it was not kept"
            )
        part = target + ".part"
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, target)
        fsync_dir(os.path.dirname(target))

    def _download(self, remote: Remote, part: str) -> None:
        size = remote.size or 0
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        if offset > size:
            offset = 0
        resumed = offset > 0
        self.progress.skip_bytes(offset)
        self._fetch_into(remote, part, offset)
        if _verified(part, remote):
            return
        os.unlink(part)
        if resumed:
            # The old partial file may be what was wrong: once more, whole.
            self._fetch_into(remote, part, 0)
            if _verified(part, remote):
                return
            os.unlink(part)
        raise PullError(
            f"{remote.key}: size or sha256 does not match the manifest; the download was deleted"
        )

    def _fetch_into(self, remote: Remote, part: str, offset: int) -> None:
        size = remote.size or 0
        if offset and offset == size:
            return  # complete already; only verification is left
        try:
            chunks, start = self.source.fetch(remote, offset)
        except ResumeRefusedError:
            chunks, start = self.source.fetch(remote, 0)
        mode = "r+b" if os.path.exists(part) else "wb"
        with contextlib.closing(chunks), open(part, mode) as f:
            f.seek(start)
            f.truncate()
            written = start
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
                self.progress.advance(len(chunk))
                if written > size:
                    break  # longer than the manifest says: fails verification
            f.flush()
            os.fsync(f.fileno())
        if written < size:
            # The connection ended early (urllib does not raise for that):
            # keep what came for the next run to resume.
            raise PullError(
                f"{remote.key}: download interrupted at byte {written} of {size}; "
                "the next run resumes it"
            )

    # Unpacking

    def _mbox_path(self, set_name: str) -> str:
        return os.path.join(self.dest, set_name, f"{set_name}.mbox")

    def _catch_up_unpacking(self, sets: list[str]) -> None:
        """Before anything new: finish every unpack an interrupted run left
        (whatever this run's --unpack), and with --unpack, unpack the
        followed sets' bundles that earlier runs fetched without it. Key
        order, so an mbox gets its bundles oldest first."""
        for key, entry in sorted(self.state.bundles.items()):
            unpacked = entry.get("unpacked", {})
            modes = [m for m, done in unpacked.items() if done is False]
            fresh = self.unpack is not None and self.unpack not in unpacked
            if fresh and key.split("/", 1)[0] in sets:
                modes.append(str(self.unpack))
            final, _ = self._paths(key)
            if not modes or not os.path.isfile(final):
                # Moved or deleted after processing: the state file still
                # says it is done, so it is neither fetched nor unpacked.
                continue
            if fresh:
                remote = Remote(key, final, entry.get("size"), entry.get("sha256"))
                try:
                    ok = _verified(final, remote)
                except OSError as e:
                    self.fail(f"{key}: cannot read it to unpack: {e}")
                    continue
                if not ok:
                    self.fail(f"{key}: {final} no longer matches its size and sha256; not unpacked")
                    continue
            for mode in modes:
                self._unpack(key, entry, mode)

    def _unpack(self, key: str, entry: dict[str, Any], mode: str) -> None:
        """Unpack the fetched bundle ``key`` into ``mode``'s target, recorded
        in the state file before (False) and after (True)."""
        final, _ = self._paths(key)
        set_name = key.split("/", 1)[0]
        unpacked = entry.setdefault("unpacked", {})
        if mode == "mbox" and unpacked.get("mbox") is not False:
            # Where this bundle's append begins; an interrupted append is
            # cut back to it.
            target = self._mbox_path(set_name)
            entry["mbox_offset"] = os.path.getsize(target) if os.path.exists(target) else 0
        unpacked[mode] = False
        self.state.save()
        skipped: list[Skipped] = []
        try:
            if mode == "mbox":
                unpack_mbox(final, self._mbox_path(set_name), entry.get("mbox_offset", 0))
            elif mode == "wire":
                target = os.path.join(self.dest, set_name, WIRE_DIR)
                skipped = unpack_maildir(final, target, key, wire_bytes)
            else:
                unpack_maildir(final, os.path.join(self.dest, set_name, "maildir"), key)
        except (OSError, ValueError, EOFError, zlib.error) as e:
            self.fail(f"{key}: unpacking ({mode}): {e}")
            return
        if mode == "wire":
            self._report_skipped(key, skipped)
        # Done even with messages skipped: they have no wire bytes to give,
        # so a later run would only fail on them again.
        unpacked[mode] = True
        self.state.save()

    def _report_skipped(self, key: str, skipped: list[Skipped]) -> None:
        for s in skipped[:MAX_SKIPPED_REPORTED]:
            named = f" ({s.message_id})" if s.message_id else ""
            self.fail(
                f"{key}: unpacking (wire): message {s.index}{named} skipped, "
                f"no wire bytes: {s.error}; its stored form is in the bundle"
            )
        if len(skipped) > MAX_SKIPPED_REPORTED:
            self.fail(
                f"{key}: unpacking (wire): {len(skipped) - MAX_SKIPPED_REPORTED} more "
                f"messages skipped ({len(skipped)} in all)"
            )


def _tokens(values: list[str], sets: list[str]) -> dict[str, str] | str:
    """set -> token from ``--token TOKEN`` / ``--token SET=TOKEN`` (and
    SPAMTRAP_TOKEN); an error message if a set has none."""
    default = os.environ.get("SPAMTRAP_TOKEN")
    per_set: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name in sets:
            per_set[name] = rest
        else:
            default = value
    tokens = {}
    for set_name in sets:
        token = per_set.get(set_name, default)
        if not token:
            return f"no token for set {set_name} (--token TOKEN or --token {set_name}=TOKEN)"
        tokens[set_name] = token
    return tokens


def _source(args: argparse.Namespace, err: TextIO) -> Source | None:
    if args.http:
        tokens = _tokens(args.token, args.set)
        if isinstance(tokens, str):
            print(f"spamtrap pull: {tokens}", file=err)
            return None
        try:
            return FeedSource(args.http, tokens, args.timeout)
        except PullError as e:
            print(f"spamtrap pull: --http: {e}", file=err)
            return None
    if args.mail:
        return MailSource(args.mail, args.timeout)
    try:
        return S3Source(args.s3, args.endpoint, args.region, args.timeout)
    except ValueError as e:
        print(f"spamtrap pull: --s3: {e}", file=err)
        return None


def run(args: argparse.Namespace, err: TextIO | None = None) -> int:
    """Run ``spamtrap pull`` with parsed arguments; the exit status."""
    err = err if err is not None else sys.stderr
    bad = [s for s in args.set if not valid_set_name(s)]
    if bad:
        print(f"spamtrap pull: invalid set name {bad[0]!r}", file=err)
        return EXIT_USAGE
    if args.overlap < 0 or args.timeout <= 0:
        print("spamtrap pull: --overlap takes 0 or more seconds, --timeout more than 0", file=err)
        return EXIT_USAGE
    if args.wire and args.unpack != "maildir":
        print("spamtrap pull: --wire needs --unpack maildir (one file per message)", file=err)
        return EXIT_USAGE
    unpack = "wire" if args.wire else args.unpack
    source = _source(args, err)
    if source is None:
        return EXIT_USAGE
    dest = os.path.abspath(args.dest)
    state_path = args.state or os.path.join(dest, STATE_NAME)
    show = args.progress or (not args.quiet and err.isatty())
    progress = Progress(err, show)
    try:
        os.makedirs(dest, exist_ok=True)
        with locked(state_path):
            puller = Puller(source, dest, State(state_path), unpack, progress, args.overlap)
            try:
                puller.run(list(dict.fromkeys(args.set)))  # each set once
            except KeyboardInterrupt:
                progress.error("interrupted; the next run resumes where this one stopped")
                return EXIT_FAILED
    except (PullError, OSError) as e:
        progress.error(str(e))
        return EXIT_FAILED
    progress.finish(
        f"{puller.fetched} new bundle(s), {megabytes(puller.fetched_bytes)} MB"
        + (f"; {puller.failures} error(s)" if puller.failures else "")
    )
    return EXIT_FAILED if puller.failures else EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        metavar="NAME",
        action="append",
        required=True,
        help="a set to follow (repeatable)",
    )
    p.add_argument("--dest", metavar="DIR", required=True, help="where bundles go: DIR/<set>/")
    p.add_argument("--state", metavar="FILE", help=f"the state file (default: DIR/{STATE_NAME})")
    p.add_argument(
        "--unpack",
        choices=("maildir", "mbox"),
        help="also write each message to DIR/<set>/maildir or append to DIR/<set>/<set>.mbox",
    )
    p.add_argument(
        "--wire",
        action="store_true",
        help=(
            f"with --unpack maildir: write each message's exact wire bytes (metadata block "
            f"removed, line ends as sent) to the maildir DIR/<set>/{WIRE_DIR}"
        ),
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="print errors only")
    shown.add_argument(
        "--progress", action="store_true", help="show progress even when stderr is no terminal"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--http", metavar="URL", help="a spamtrap node's base URL (its feeds)")
    source.add_argument("--mail", metavar="PATH", help="a maildir or mbox with the list notices")
    source.add_argument("--s3", metavar="URL", help="s3://bucket/prefix of the store")
    p.add_argument(
        "--token",
        metavar="[SET=]TOKEN",
        action="append",
        default=[],
        help="bearer token for --http, for every set or one (default: $SPAMTRAP_TOKEN)",
    )
    p.add_argument(
        "--endpoint", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 or AWS)"
    )
    p.add_argument("--region", metavar="NAME", help="S3 region (default: the AWS configuration)")
    p.add_argument(
        "--overlap",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_OVERLAP,
        help="list from this long before the newest bundle seen (default: one day)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="network timeout (default: 60)",
    )
