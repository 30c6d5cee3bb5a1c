"""Test doubles shared by several test modules: the public ones live in
``spamtrap.testing`` and are re-exported here for the existing imports."""

from __future__ import annotations

from spamtrap.testing import ListWorkSource, MemoryStore, SyncPool

__all__ = ["ListWorkSource", "MemoryStore", "SyncPool"]
