"""spamtrap: takes trap mail over SMTP, cleans it, and publishes gzipped mbox bundles."""

__version__ = "0.1.0"
