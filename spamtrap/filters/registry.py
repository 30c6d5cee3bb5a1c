"""Builds the configured stage list, in ``filters.order``.

Every built-in stage module has ``make(config, reactor) -> Stage | None``
(None: switched off in the config); custom stages are loaded by dotted path.
"""

from __future__ import annotations

import importlib
from typing import Any

from spamtrap.config import Config
from spamtrap.filters import Stage

# Built-in stage name -> module with a make(config, reactor) function.
BUILTIN_MODULES = {
    "size": "spamtrap.filters.size",
    "virus": "spamtrap.filters.virus",
    "clamd": "spamtrap.filters.clamd",
    "feeds": "spamtrap.filters.feeds",
    "lists": "spamtrap.filters.lists",
    "bounce": "spamtrap.filters.bounce",
    "spamd": "spamtrap.filters.spamd",
}


def build_stages(cfg: Config, reactor: Any) -> list[tuple[str, Stage]]:
    custom = {c.name: c for c in cfg.filters.custom}
    stages: list[tuple[str, Stage]] = []
    for name in cfg.filters.order:
        if name in custom:
            from spamtrap.filters.custom import load

            stages.append((name, load(custom[name])))
            continue
        module = BUILTIN_MODULES.get(name)
        if module is None:
            continue
        stage = importlib.import_module(module).make(cfg, reactor)
        if stage is not None:
            stages.append((name, stage))
    return stages
