"""The unit layer's guard: a unit test opens no socket and starts no process.

Every test under tests/unit runs with socket binding, connecting and listening,
and every way of starting a process (subprocess, os.fork, os.posix_spawn,
the reactor's spawnProcess), replaced by a stub that fails the test with the
name of the call and where the test belongs instead. The guard keeps the
layers from drifting: a test that needs a real server goes to
tests/integration, one that needs a real twistd to tests/system
(docs/testing.md).

``socket.socketpair`` stays allowed: it opens no port, and the reactor's
waker may use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from tests.support.pipeline_world import stop_abandoned_worlds

ADVICE = (
    "unit tests open no sockets and start no processes: use task.Clock, "
    "StringTransport and the doubles in spamtrap.testing, or move the test to "
    "tests/integration (real servers) or tests/system (a real twistd); "
    "see docs/testing.md"
)


class LayerViolationError(AssertionError):
    """A unit test reached for the network or a process."""


def refuse(what: str) -> Callable[..., NoReturn]:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise LayerViolationError(f"{what} in a unit test: {ADVICE}")

    return refused


SOCKET_CALLS = ("bind", "connect", "connect_ex", "listen")
PROCESS_CALLS: tuple[tuple[Any, str, str], ...] = (
    (subprocess.Popen, "__init__", "subprocess.Popen"),
    (os, "fork", "os.fork"),
    (os, "forkpty", "os.forkpty"),
    (os, "posix_spawn", "os.posix_spawn"),
    (os, "posix_spawnp", "os.posix_spawnp"),
    (os, "system", "os.system"),
    (os, "execv", "os.execv"),
    (os, "execve", "os.execve"),
)


@pytest.fixture(autouse=True)
def no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in SOCKET_CALLS:
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.{name}()"))
    for owner, name, label in PROCESS_CALLS:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, refuse(f"{label}()"))
    from twisted.internet import reactor

    monkeypatch.setattr(reactor, "spawnProcess", refuse("reactor.spawnProcess()"))
    yield


@pytest.fixture(autouse=True)
def abandoned_worlds() -> Iterator[None]:
    yield
    stop_abandoned_worlds()
