"""Benchmarks that measure competing paths side by side in one process and report ratios.

Absolute numbers on a shared 2-core machine drift with the load; ratios taken in the same run, with the
candidates interleaved call by call, are what the targets in the issues are about. Results go to
``bench/results/*.json``; ``python -m bench.run_all`` renders them into ``BENCHMARKS.md``.
"""
