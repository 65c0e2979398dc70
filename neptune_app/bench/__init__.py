"""The benchmark suite (used by `benchmarks/*.py` and `neptune bench`).

Rules: contenders are measured side by side in one run, alternated run by run
(ABAB...), medians reported with ratios; peak memory of each contender is measured
in its own process. Nothing here is asserted in tests.
"""
