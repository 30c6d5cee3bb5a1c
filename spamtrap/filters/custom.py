"""Operators' own stages, loaded by dotted path (see docs/stages.md).

A custom stage is configured as::

    filters:
      custom:
        helo-literal:
          callable: mytrap.stages:make
          options: {feed_sets: {donor1: [donor1]}}
      order: [size, virus, feeds, helo-literal, lists, bounce]

``callable`` names a factory, "package.module:name" (the name may be
dotted, e.g. "module:Class.create"). It is called once at start-up with the
options as keyword arguments, ``factory(**options)``, and returns the stage:
a callable taking an Envelope and returning a verdict. Keyword arguments
make a misspelt option an error at start-up, not a silently ignored key.
"""

from __future__ import annotations

import importlib
from typing import Any

from spamtrap.config import CustomStageConfig
from spamtrap.filters import Stage


class StageLoadError(Exception):
    """A custom stage could not be loaded; the message names it and its path."""


def load(c: CustomStageConfig) -> Stage:
    where = f"custom stage {c.name!r} ({c.callable})"
    module_name, _, attr = c.callable.partition(":")
    if not module_name or not attr:
        raise StageLoadError(f"{where}: expected 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the operator's to see
        raise StageLoadError(f"{where}: cannot import {module_name!r}: {type(e).__name__}: {e}")
    for name in attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise StageLoadError(f"{where}: {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise StageLoadError(f"{where}: {attr!r} is not callable")
    bad = [k for k in c.options if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise StageLoadError(f"{where}: option names must be identifiers, got {bad!r}")
    try:
        stage = obj(**c.options)
    except Exception as e:  # noqa: BLE001 - a factory may reject its options any way it likes
        raise StageLoadError(f"{where}: the factory failed: {type(e).__name__}: {e}")
    if not callable(stage):
        raise StageLoadError(
            f"{where}: the factory returned {type(stage).__name__}, not a stage (a callable)"
        )
    return stage  # type: ignore[no-any-return]
