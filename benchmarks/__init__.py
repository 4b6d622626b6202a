"""sidenet's benchmarks: a harness over the public library (benchmarks/harness.py) and one module per
experiment, each with ``run(args) -> dict`` and its own command line (``python -m benchmarks.NAME``);
``python -m benchmarks run`` runs them all in dependency order (the table in benchmarks/__main__.py),
writes their JSON results and renders BENCHMARKS.md once."""
