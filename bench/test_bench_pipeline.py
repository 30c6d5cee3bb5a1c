"""pytest-benchmark: the cleaning pipeline over spam-2 (run explicitly;
bench/ is not in the test suite's testpaths)."""

from __future__ import annotations

from typing import Any

from bench.pipeline_bench import corpus_envelopes, pipeline, process


def test_pipeline_over_spam2(benchmark: Any) -> None:
    envs = corpus_envelopes()
    stages, collator = pipeline()
    kept = benchmark.pedantic(process, args=(stages, collator, envs), rounds=5, iterations=1)
    # Virus and bounce stages leave real spam alone (one real bounce in spam-2).
    assert len(envs) - 5 <= kept <= len(envs)
    benchmark.extra_info["messages"] = len(envs)
    benchmark.extra_info["msg_per_s"] = len(envs) / benchmark.stats.stats.median
