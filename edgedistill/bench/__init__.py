"""Benchmark harness: timing statistics (more to come: suites, reports, CI gate)."""
