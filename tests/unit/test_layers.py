"""The test suite's layers hold (docs/testing.md): the unit guard refuses
sockets and processes, test modules never import one another, and bench/
imports only tests.support."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import reactor

from tests.unit.conftest import LayerViolationError

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: socket.socket().bind(("127.0.0.1", 0)), "socket.bind()"),
        (lambda: socket.socket().connect(("127.0.0.1", 9)), "socket.connect()"),
        (lambda: socket.socket().connect_ex(("127.0.0.1", 9)), "socket.connect_ex()"),
        (lambda: socket.socket().listen(), "socket.listen()"),
        (lambda: socket.create_connection(("127.0.0.1", 9), timeout=1), "socket.connect()"),
        (lambda: subprocess.run([sys.executable, "-c", "pass"], check=False), "subprocess.Popen()"),
        (lambda: os.fork(), "os.fork()"),
        (lambda: os.system("true"), "os.system()"),  # noqa: S605 - refused before a shell
        (lambda: reactor.spawnProcess(None, sys.executable), "reactor.spawnProcess()"),
    ],
)
def test_a_unit_test_cannot_open_a_socket_or_start_a_process(call: object, named: str) -> None:
    with pytest.raises(LayerViolationError, match="in a unit test") as raised:
        call()  # type: ignore[operator]
    assert str(raised.value).startswith(named)
    assert "tests/integration" in str(raised.value) and "docs/testing.md" in str(raised.value)


def test_a_socketpair_needs_no_port_and_stays_allowed() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x")
        assert b.recv(1) == b"x"


def imports_of(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def offenders(root: Path, allowed: str) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for name in imports_of(path):
            if name.startswith("tests.") and not name.startswith(allowed):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


OWN_GUARD = "tests/unit/test_layers.py imports tests.unit.conftest"


def test_test_modules_import_only_the_support_helpers() -> None:
    found = sorted(set(offenders(REPO / "tests", "tests.support")) - {OWN_GUARD})
    assert found == [], "move shared helpers to tests/support:\n" + "\n".join(found)


def test_benchmarks_import_only_the_support_helpers() -> None:
    assert offenders(REPO / "bench", "tests.support") == []
