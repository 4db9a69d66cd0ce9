"""gslora benchmark suite: ``python -m benchmarks.run_all`` (what ``make bench`` runs).

Each ``bench_*.py`` script compares providers side by side in one process with the shared
harness (:mod:`benchmarks.harness`), prints a fixed-width table and appends JSON lines under
``benchmarks/results/``; :mod:`benchmarks.report` turns those lines into ``BENCHMARKS.md``.
"""
