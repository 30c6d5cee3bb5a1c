"""Work: the spool or Redis queue, the stage pipeline, collation, redaction and dedup."""
