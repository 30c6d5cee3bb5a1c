"""The partners of the forward output's tests: a private Postfix that takes
mail for partner.test into one Maildir per address (Debian ``postfix``),
and reads back what it delivered."""

from __future__ import annotations

import pwd
import shutil

from tests.support.mta import PrivatePostfix
from tests.support.node import require_binary
from tests.support.poll import until

PARTNERS = ["abuse@partner.test", "spam@partner.test"]


class Partner:
    """A private Postfix that takes mail for partner.test into one Maildir
    per address (the ``virtual`` delivery agent)."""

    def __init__(self, port: int | None = None) -> None:
        require_binary("postfix")
        owner = pwd.getpwnam("postfix")
        boxes = ", ".join(f"{a}={a.split('@')[0]}/" for a in PARTNERS)
        self.mta = PrivatePostfix(
            main={
                "virtual_mailbox_domains": "partner.test",
                "virtual_mailbox_base": "MAILDIRS",
                "virtual_mailbox_maps": f"inline:{{ {boxes} }}",
                "virtual_uid_maps": f"static:{owner.pw_uid}",
                "virtual_gid_maps": f"static:{owner.pw_gid}",
            },
            master="virtual   unix  -       n       n       -       -       virtual\n",
            port=port,
        )
        self.maildirs = self.mta.base / "mail"
        self.maildirs.mkdir()
        shutil.chown(self.maildirs, "postfix", "postfix")
        main_cf = self.mta.config_dir / "main.cf"
        main_cf.write_text(main_cf.read_text().replace("MAILDIRS", str(self.maildirs)))

    @property
    def port(self) -> int:
        return self.mta.port

    def delivered(self, address: str) -> list[bytes]:
        """The messages in ``address``'s Maildir, oldest first, with the CRLF
        line ends they travelled with (a Maildir keeps LF)."""
        new = self.maildirs / address.split("@")[0] / "new"
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
        return [p.read_bytes().replace(b"\n", b"\r\n") for p in files]

    async def wait(self, count: int, deadline: float = 30) -> dict[str, list[bytes]]:
        """Each partner's messages, once each has at least ``count``."""
        try:
            await until(
                lambda: all(len(self.delivered(a)) >= count for a in PARTNERS),
                deadline,
                f"{count} messages for each partner",
                interval=0.1,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; not delivered:\n{self.mta.log()}") from None
        return {a: self.delivered(a) for a in PARTNERS}
