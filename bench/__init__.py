"""Benchmarks: `python -m bench.run [--quick]` prints every figure next to a baseline measured in
the same run and writes bench/RESULTS.md. One module per section: decode.py (1, 2), vision.py (3),
memory.py (4), node_e2e.py (5), footprint.py (6); common.py holds the timing rules.
"""
