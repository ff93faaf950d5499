"""Benchmarks that print tables (never run by the test suite): `perceiver bench` / `python -m perceiver_cli.bench`."""
