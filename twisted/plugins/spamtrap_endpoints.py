"""Endpoint string parser for ``reuseport:`` (see spamtrap.intake.endpoints).

Kept tiny: twistd and serverFromString import every plugin module.
"""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ReusePortParser:
    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:
        from spamtrap.intake.endpoints import parse

        return parse(reactor, *args, **kwargs)


reuseport = _ReusePortParser()
