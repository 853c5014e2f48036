"""pgwarden's benchmarks: `python -m bench [--quick]` (see README)."""
