"""scancache benchmarks: ``python -m benchmarks.run [--quick] [--out BENCHMARKS.md]``.

Not part of ``make test``: figures depend on the machine. Every benchmark measures scancache
and its baseline in the same run on the same files, so the ratios are what matter.
"""
