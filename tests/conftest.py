"""Plugins of the whole test suite: the session's PostgreSQL server (tests/pg.py)."""

pytest_plugins = ["tests.pg"]
