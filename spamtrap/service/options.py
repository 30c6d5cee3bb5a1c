"""``twistd spamtrap``'s command-line options (spamtrap.service.compose
hands them to twistd as its ``Options``): each option overrides one config
key, and is checked with the config document by that key's own rule."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from spamtrap.config import (
    DEFAULT_DOCUMENT,
    ConfigError,
    Override,
    load_config,
    parse_config,
)


class Options(usage.Options):
    synopsis = "[--config FILE] [--smtp ENDPOINT] [--http ENDPOINT] [--data-dir DIR] ..."
    longdesc = (
        "Run a spamtrap node. With no --config it runs the embedded default: a "
        "catch-all trap on tcp:2525, HTTP on tcp:8025, data in ./spamtrap-data "
        "and one set 'all'. ENDPOINT is a Twisted server endpoint description, "
        "e.g. tcp:25:interface=127.0.0.1 or systemd:domain=INET:index=0."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (see etc/spamtrap.yaml)"],
        ["smtp", None, None, "SMTP endpoint (overrides smtp.listen)"],
        ["http", None, None, "HTTP endpoint (overrides http.listen)"],
        ["data-dir", "d", None, "data directory: spool, open bundles, local store"],
        ["store", None, None, "bundle store URL: file:///path or s3://bucket/prefix"],
        ["node", None, None, "node name used in bundle keys and metadata"],
        ["role", None, None, "listener (SMTP into the queue), worker (filters from it) or all"],
        [
            "queue",
            None,
            None,
            "Redis work queue URL: redis://[user:pass@]host:port/db or rediss://",
        ],
    ]

    def parseOptions(self, options: Any = None) -> None:
        """Parse, and on any error print it and exit 1.

        twistd prints a UsageError with its whole help text to stdout, and
        bookworm's twistd3 (Twisted 22.4) then exits 0: systemd would never
        mark the unit failed. So the errors go to stderr and the exit is 1
        whatever twistd's version.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stdout.flush()
            sys.stderr.write(f"twistd spamtrap: {e}\n(twistd spamtrap --help lists the options)\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    def postOptions(self) -> None:
        # The options are merged into the config document and checked with
        # it, once, by the keys' own rules; their errors name the option.
        overrides = [
            Override(f"--{option}", path, self[option])
            for option, path in OVERRIDES.items()
            if self[option]
        ]
        try:
            if self["config"]:
                self.config = load_config(self["config"], overrides)
            else:
                self.config = parse_config(DEFAULT_DOCUMENT, "<default>", overrides)
        except ConfigError as e:
            (only,) = e.errors if len(e.errors) == 1 else (None,)
            if only is not None and only.option is not None:
                raise usage.UsageError(str(e))
            raise usage.UsageError(f"configuration errors:\n{e}")


# Each option and the config key it sets.
OVERRIDES = {
    "smtp": "smtp.listen",
    "http": "http.listen",
    "data-dir": "data_dir",
    "store": "store.url",
    "node": "node",
    "role": "role",
    "queue": "queue.url",
}
