"""Test doubles shared by several test modules."""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure


class SyncPool:
    """Twisted's ThreadPool contract (what deferToThreadPool uses), run at
    once in the calling thread."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)
