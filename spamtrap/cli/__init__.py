"""The spamtrap command: check-config, explain and pull."""
