"""Benchmarks, run by hand (results in BENCHMARKS.md); tests/test_bench_smoke.py keeps them from rotting."""
