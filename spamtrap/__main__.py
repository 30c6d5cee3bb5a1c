"""``python -m spamtrap``: the same as the ``spamtrap`` command."""

import sys

from spamtrap.cli import main

sys.exit(main())
