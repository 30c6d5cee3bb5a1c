"""The twistd service: the composition root and the start-up children."""
