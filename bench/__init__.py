"""Benchmarks of the ingest path (scripts, not tests): run them as `python -m bench.<name>`."""
