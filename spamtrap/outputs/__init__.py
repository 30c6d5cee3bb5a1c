"""Per-message outputs: onward reporting and forwarding (see base and docs/outputs.md).

A kind is one module here, ``spamtrap/outputs/<type>.py``, with ``Settings``
(a subclass of spamtrap.config.schema.OutputConfig) and ``build``; the
config's ``type`` key names the module. The other modules here are the
machinery every kind shares (base, queue, runner, service).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from spamtrap.config.rules import _unknown
from spamtrap.config.schema import OutputConfig

# Modules of this package that are not kinds.
_MACHINERY = frozenset({"base", "queue", "runner", "service", "arf"})


def _kind_module(kind: str) -> ModuleType | None:
    """The module of a kind, or None when ``kind`` names none."""
    if kind.startswith("_") or kind in _MACHINERY or not kind.isidentifier():
        return None
    try:
        module = importlib.import_module(f"{__name__}.{kind}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{kind}":
            return None
        raise ValueError(f"output type {kind!r} cannot be loaded: {e}") from None
    settings = getattr(module, "Settings", None)
    is_kind = isinstance(settings, type) and issubclass(settings, OutputConfig)
    return module if is_kind and callable(getattr(module, "build", None)) else None


def kinds() -> list[str]:
    """The output types this installation has, sorted."""
    names = [m.name for m in pkgutil.iter_modules(__path__)]
    found = []
    for name in sorted(names):
        try:
            if _kind_module(name) is not None:
                found.append(name)
        except ValueError:
            found.append(name)  # a kind whose dependency is missing is still a kind
    return found


def settings_class(kind: str) -> type[OutputConfig]:
    """The Settings class of ``type: <kind>``. Raises ValueError (with "did
    you mean") for a type that names no kind."""
    module = _kind_module(kind)
    if module is None:
        raise ValueError(_unknown("output type", kind, kinds()))
    settings: type[OutputConfig] = module.Settings
    return settings


def kind_module(kind: str) -> ModuleType:
    """The module of a configured (so known) kind, for its ``build``."""
    module = _kind_module(kind)
    if module is None:
        raise ValueError(_unknown("output type", kind, kinds()))
    return module
