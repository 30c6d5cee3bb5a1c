"""The twistd plugin: ``twistd spamtrap``.

twistd imports every plugin module on every run, so this stays one line and
imports the real code lazily through the ``module`` string.
"""

from twisted.application.service import ServiceMaker

spamtrap = ServiceMaker(
    "spamtrap",
    "spamtrap.service.compose",
    "A spamtrap: trap mail over SMTP into gzipped mbox bundles",
    "spamtrap",
)
