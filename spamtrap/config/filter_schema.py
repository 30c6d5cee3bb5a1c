"""The filter stages' declarations (``filters:``, docs/stages.md).

Declared like the rest of spamtrap.config.schema, in a module of its own;
FilterConfig is the ``filters`` section of its Config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from spamtrap.config.rules import (
    MIB,
    _callable_path,
    _choice,
    _duration,
    _extension,
    _header_name,
    _integer,
    _meta_field,
    _name,
    _nonempty,
    _port,
    _size,
    rule,
)

DANGEROUS_EXTENSIONS = [
    "exe", "scr", "com", "pif", "bat", "cmd", "cpl", "msi", "msp", "dll", "sys",
    "js", "jse", "vbs", "vbe", "wsf", "wsh", "hta", "ps1", "psm1", "reg", "lnk",
    "iso", "img", "vhd", "vhdx", "jar", "apk", "chm", "scf", "url", "inf",
]  # fmt: skip


@dataclass(frozen=True)
class VirusConfig:
    """Stage "virus": the fast built-in malware detector."""

    enabled: bool = True
    # Attachment file name extensions that are discarded on sight.
    extensions: list[str] = field(
        default_factory=lambda: list(DANGEROUS_EXTENSIONS), metadata=rule(_extension)
    )
    # Zip archives are opened with these limits, so a zip bomb does no harm.
    max_zip_depth: int = field(default=2, metadata=rule(_integer(0)))
    max_zip_entries: int = field(default=1000, metadata=rule(_integer(1)))
    max_zip_bytes: int = field(default=32 * MIB, metadata=rule(_size()))


@dataclass(frozen=True)
class ClamdConfig:
    """Stage "clamd": ClamAV's daemon over its INSTREAM protocol."""

    enabled: bool = False
    # A unix socket path; when unset, host and port are used.
    socket: str | None = field(default=None, metadata=rule(_nonempty))
    host: str = "127.0.0.1"
    port: int = field(default=3310, metadata=rule(_port))
    # Below filters.stage_budget.
    timeout: float = field(default=8.0, metadata=rule(_duration(positive=True)))
    max_concurrency: int = field(default=4, metadata=rule(_integer(1)))
    # What to do with a message when clamd is down or times out.
    on_error: str = field(default="keep", metadata=rule(_choice("keep", "discard")))


@dataclass(frozen=True)
class ListRule:
    """A named discard rule: the message is discarded when ``regex`` is
    found in a header (``header:``) or metadata field (``meta:``)."""

    name: str = field(metadata=rule(_name))
    regex: re.Pattern[str]
    header: str | None = field(default=None, metadata=rule(_header_name))
    meta: str | None = field(default=None, metadata=rule(_meta_field))


@dataclass(frozen=True)
class ListsConfig:
    """Stage "lists": discard lists for retired trap addresses and ham."""

    rules: list[ListRule] = field(default_factory=list)
    # YAML files holding more rules (a list of {name, regex, header|meta}).
    # They reload on SIGHUP and when they change (checked every interval).
    files: list[str] = field(default_factory=list)
    reload_interval: float = field(default=10.0, metadata=rule(_duration(positive=True)))


@dataclass(frozen=True)
class BounceConfig:
    """Stage "bounce": the native bounce and backscatter detector."""

    enabled: bool = True


@dataclass(frozen=True)
class SpamdConfig:
    """Stage "spamd": ask a real SpamAssassin, discard on ANY_BOUNCE_MESSAGE."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=783, metadata=rule(_port))
    # Below filters.stage_budget.
    timeout: float = field(default=8.0, metadata=rule(_duration(positive=True)))
    max_concurrency: int = field(default=3, metadata=rule(_integer(1)))
    on_error: str = field(default="keep", metadata=rule(_choice("keep", "discard")))


@dataclass(frozen=True)
class CustomStageConfig:
    """An operator's own stage: ``callable`` is "package.module:factory",
    called once with ``options`` (a mapping) to build the stage."""

    name: str
    callable: str = field(metadata=rule(_callable_path))
    options: dict[str, Any] = field(default_factory=dict)


BUILTIN_STAGES = ["size", "virus", "clamd", "feeds", "lists", "bounce", "spamd"]


# Measured side by side on 2 cores (docs/benchmarks.md, "The GIL switch
# interval"; python -m bench.run switch), smtp-source -s 20 -m 5000 to the
# embedded default: 1 ms cost 724 us of CPU per message, 2.5 ms 658 (-9%,
# +6% msg/s), 5 ms 631 (-13%). The price is SMTP tail latency while a
# pure-Python stage saturates the workers: p99 241 ms at 1 ms, 304 ms at
# 2.5 ms (the hostile-content probe: p99 32 -> 36 ms, its goal is 50 ms).
SWITCH_INTERVAL = 0.0025
SWITCH_INTERVAL_RANGE = (0.0001, 0.1)


def _switch_interval(value: object) -> float:
    seconds = _duration()(value)
    low, high = SWITCH_INTERVAL_RANGE
    if not low <= seconds <= high:
        raise ValueError(f"must be between 0.1ms and 100ms, got {value!r}")
    return seconds


@dataclass(frozen=True)
class FilterConfig:
    # Bounded thread pool for filter stages and bundle writes. 0 = intake
    # only: SMTP still answers 250 into the spool, which sheds its oldest.
    workers: int = field(default=2, metadata=rule(_integer(0)))
    # Stage "size": discard messages above this many bytes.
    max_size: int = field(default=4 * MIB, metadata=rule(_size()))
    # The stages in the order they run: built-in names and custom ones.
    # A built-in stage left out of the list does not run.
    order: list[str] = field(default_factory=lambda: list(BUILTIN_STAGES), metadata=rule(_name))
    # Most seconds one stage may spend on one message; past it the stage's
    # verdict is "error" and the message goes on (it is never lost).
    stage_budget: float = field(default=10.0, metadata=rule(_duration(positive=True)))
    # CPython's switch interval: how long a filter thread may keep the GIL
    # while the reactor (SMTP) waits for it after a system call. Shorter
    # answers SMTP sooner while the filters are saturated and costs CPU in
    # thread switches. See SWITCH_INTERVAL.
    switch_interval: float = field(default=SWITCH_INTERVAL, metadata=rule(_switch_interval))
    virus: VirusConfig = field(default_factory=VirusConfig)
    clamd: ClamdConfig = field(default_factory=ClamdConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)
    custom: list[CustomStageConfig] = field(default_factory=list, metadata=rule(keyed_by="name"))
