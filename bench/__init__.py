"""Benchmarks of zaphub_db against raw psycopg, run by `nox -s bench` (never by the tests)."""
