"""Intake: the SMTP session, its parsing, PROXY, relays, traps, TLS and rDNS."""
