"""spamtrap pull's progress bar."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """A one-line progress bar on a terminal; nothing otherwise."""

    WIDTH = 24

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.bundles = self.total_bundles = 0
        self.bytes = self.total_bytes = 0
        self._last = 0.0
        self._shown = False

    def start(self, bundles: int, total_bytes: int) -> None:
        self.total_bundles, self.total_bytes = bundles, total_bytes
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.bytes += n
        self._draw()

    def done(self, n: int = 1) -> None:
        self.bundles += n
        self._draw(force=True)

    def skip_bytes(self, n: int) -> None:
        """Bytes that will not come (a bundle failed or was resumed)."""
        self.total_bytes = max(self.bytes, self.total_bytes - n)

    def error(self, text: str) -> None:
        """An error line, above the bar."""
        self._clear()
        print(f"spamtrap pull: {text}", file=self.stream)
        self._draw(force=True)

    def finish(self, summary: str) -> None:
        if self.enabled:
            self._clear()
            print(summary, file=self.stream)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or not self.total_bundles:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        fraction = self.bytes / self.total_bytes if self.total_bytes else 1.0
        filled = int(self.WIDTH * min(fraction, 1.0))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(
            f"\r[{bar}] {self.bundles}/{self.total_bundles} bundles "
            f"{megabytes(self.bytes)}/{megabytes(self.total_bytes)} MB"
        )
        self.stream.flush()
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}"
