"""Benchmark scripts of sidenet; each writes JSON under benchmarks/results/ and regenerates BENCHMARKS.md."""
