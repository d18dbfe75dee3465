"""Benchmarks of the serving image: scripts that print a table and write JSON, never tests."""
