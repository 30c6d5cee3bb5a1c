"""``python -m spamtrap``: the same as the ``spamtrap`` command."""

import sys

from spamtrap.cli.main import main

sys.exit(main())
