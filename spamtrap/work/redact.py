"""Trap-address redaction for sets shared with other organisations.

Trap addresses are the operator's secret. A set with
``redact_trap_addresses`` gets a copy of each message in which every trap
address is masked: ASCII letters (and 8-bit bytes) become ``x``, digits
become ``1``, everything else stays, and the ``@`` (or ``%40``) between
local part and domain stays. Length and structure are kept, so hash-based
tools still work on the rest of the message.

A trap address is any ``local@domain`` whose domain is a trap domain (any
local part, even an empty one), or that equals one of the given addresses
(case-insensitive). Internationalised trap domains match in both forms:
configured as ``bücher.example`` or as ``xn--bcher-kva.example``, either
form in a message is a trap domain. Non-trap addresses are left as they are.

Where it looks, on raw bytes and bounded like :mod:`spamtrap.mime`. Every
encoding is undone into a *view* (decoded bytes that remember which raw
unit each byte came from), the view is masked, and each changed unit is
written back in its own encoding at its own length:

- every header block (the message's and each part's): raw text and RFC
  2047 encoded words decoded, adjacent words joined as decoders join them
  (an address may start in one word and end in the next); RFC 2231
  parameters (``filename*0*=utf-8''...%40...; filename*1*=...``)
  percent-decoded and joined across continuations; quoted parameters with
  their quoted pairs undone;
- every leaf part's body, after its transfer encoding: quoted-printable
  unit by unit (a literal stays literal, an ``=XX`` escape stays an escape,
  soft line breaks stay, so lines keep their lengths); base64 decoded and,
  if anything changed, re-encoded into the same line lengths; a base64
  ``message/rfc822`` is redacted as the message it holds;
- in text (text parts, headers, preambles): HTML character references
  (``&#64;``, ``&#x40;``, ``&commat;``, ``&period;``, with leading zeros or
  without ``;``, as HTML reads them) and URL percent escapes, each
  re-written as a reference or escape of the masked character; UTF-16 and
  UTF-32 text parts (charset from Content-Type, or a byte-order mark),
  both byte orders when the charset does not say;
- binary parts (not text): only addresses written as they are;
- preambles, epilogues and whatever lies beyond the walk's limits: as text.

Not recognised: quoted local parts (``"a b"@x``), the 8-bit part of a UTF-8
local part (only its ASCII end is masked; the trap domain is masked
anyway), bare trap domains without ``@``, U-labels in charsets other than
UTF-8, UTF-16 and UTF-32, encoded words in UTF-16, and addresses inside
compressed attachments.

Every pattern here runs in linear time: no nested quantifiers over
overlapping classes, and every scan that can fail resumes after what it
read.

The modules, each using only those before it: redact_traps (trap sets,
finding and masking addresses in bytes), redact_views (decoded views and
text read through its encodings), redact_wide (UTF-16 and UTF-32),
redact_walk (headers, parameters, transfer encodings and the MIME walk)
and this one, the API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from spamtrap.config import FeedConfig, TrapConfig
from spamtrap.message import Envelope
from spamtrap.work.redact_traps import TrapSet, mask, redact_flat
from spamtrap.work.redact_walk import redact_message


def redact(data: bytes, addresses: Iterable[str], domains: Iterable[str]) -> bytes:
    """``data`` (a message) with every trap address masked.

    ``addresses`` are whole trap addresses; any address at one of
    ``domains`` is a trap address too. Pure: no I/O, never raises on bad
    MIME."""
    traps = TrapSet(addresses, domains)
    return redact_with(data, traps)


def redact_with(data: bytes, traps: TrapSet) -> bytes:
    """As :func:`redact`, with a prepared :class:`TrapSet`."""
    if not traps:
        return data
    return redact_message(data, traps)


def redact_text(text: str, traps: TrapSet) -> str:
    """A single value (a metadata field, an address), read raw."""
    raw = text.encode("utf-8", "surrogateescape")
    new = redact_flat(raw, traps)
    return text if new == raw else new.decode("utf-8", "surrogateescape")


class EnvelopeRedactor:
    """Redacts envelopes for one config: built once, called per message
    (in a worker thread; it keeps no state between calls)."""

    def __init__(self, traps: TrapConfig, feeds: Iterable[FeedConfig]) -> None:
        addresses = list(traps.addresses) + [f.address for f in feeds]
        self.traps = TrapSet(addresses, traps.domains)

    def __call__(self, env: Envelope) -> Envelope:
        """A redacted copy of ``env``: its message bytes, its metadata
        values, its trap-hop Received line, its envelope sender (the mbox
        ``From_`` line) and its recipients. The message's own RCPT TO
        addresses count as trap addresses, which covers catch-all and
        pattern traps. Recipient domains (the ``domain`` metadata field)
        are masked whole."""
        traps = self.traps.plus(env.rcpts)
        meta = {}
        for name, values in env.meta.items():
            if name == "domain":
                meta[name] = [
                    mask(v.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
                    for v in values
                ]
            else:
                meta[name] = [redact_text(v, traps) for v in values]
        return dataclasses.replace(
            env,
            data=redact_with(env.data, traps),
            meta=meta,
            # Piece by piece, so a redacted value never joins or splits a fold.
            received=[redact_text(p, traps) for p in env.received],
            mail_from=redact_text(env.mail_from, traps),
            rcpts=[redact_text(r, traps) for r in env.rcpts],
        )


def redact_envelope(env: Envelope, traps: TrapConfig, feeds: Iterable[FeedConfig]) -> Envelope:
    """A redacted copy of ``env``; see :class:`EnvelopeRedactor`, which the
    pipeline should build once per config rather than once per message."""
    return EnvelopeRedactor(traps, feeds)(env)
