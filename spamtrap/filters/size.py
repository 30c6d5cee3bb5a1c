"""Stage "size": discard messages larger than the configured limit.

Traps keep messages up to a few MiB; larger ones are nearly always
attachments-as-payload and not worth storing (mission: "around 4 MiB").
"""

from __future__ import annotations

from typing import Any

from spamtrap.config import Config
from spamtrap.filters import Discard
from spamtrap.message import Envelope


class SizeStage:
    name = "size"

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size

    def __call__(self, env: Envelope) -> Discard | None:
        if len(env.data) > self.max_size:
            return Discard("too-large")
        return None


def make(cfg: Config, reactor: Any) -> SizeStage:
    return SizeStage(cfg.filters.max_size)
