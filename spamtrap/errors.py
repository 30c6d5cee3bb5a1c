"""Errors that cross the seams between spamtrap's components.

Each is defined once, here, so that a component recognises another's
failure by what it means, not by which module raised it: the SMTP protocol
answers a temporary refusal with 451 without importing the Redis queue, and
the pipeline stops on a stopped work source whether that is the local spool
or the queue.

Implementations subclass these for their own detail (``SpoolError``,
``QueueUnavailableError``), and callers catch the shared class.
"""

from __future__ import annotations


class WorkSourceError(Exception):
    """A work source could not hand out or return a message: it stopped, or
    a record cannot be read (see ``interfaces.WorkSource``)."""


class SourceStoppedError(WorkSourceError):
    """The work source stopped: ``get()`` hands out nothing any more."""


class IntakeUnavailableError(Exception):
    """The intake refuses a message for now and expects to take it later
    (the Redis queue is unreachable and ``queue.on_unreachable`` is
    ``tempfail``). SMTP answers ``451 4.3.0 Queue unavailable``; the sender
    retries."""
